"""Event schemas, defined once (Arrow types), with record and batch validation."""

from schemas.dtypes import SUPPORTED, TIMESTAMP_UTC, dtype_name, parse_dtype
from schemas.errors import SchemaError, ValidationError
from schemas.schema import EventSchema, Field
from schemas.source_location import SourceLocation
from schemas.transactions import TRANSACTIONS
from schemas.validation import (
    BatchValidation,
    Problem,
    RecordsValidation,
    validate_batch,
    validate_record,
    validate_records,
)

__all__ = [
    "SUPPORTED",
    "TIMESTAMP_UTC",
    "TRANSACTIONS",
    "BatchValidation",
    "EventSchema",
    "Field",
    "Problem",
    "RecordsValidation",
    "SchemaError",
    "SourceLocation",
    "ValidationError",
    "dtype_name",
    "parse_dtype",
    "validate_batch",
    "validate_record",
    "validate_records",
]
