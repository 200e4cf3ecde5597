"""Errors raised by training exports.

TenxError (schemas.errors)
└── TerminalError
    └── LabelError     the label table or the feature list is wrong; the message says how
"""

from __future__ import annotations

from featurestore.errors import TerminalError


class LabelError(TerminalError):
    """Labels or requested features cannot be exported as given."""
