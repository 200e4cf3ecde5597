"""Errors raised by training exports.

TenxError (schemas.errors)
└── TerminalError
    ├── LabelError     the label table or the feature list is wrong; the message says how
    └── TrainingError  a training set cannot be trained on as given (columns, labels, size)
"""

from __future__ import annotations

from featurestore.errors import TerminalError


class LabelError(TerminalError):
    """Labels or requested features cannot be exported as given."""


class TrainingError(TerminalError):
    """A training set, label or model cannot be trained or exported as asked."""
