"""Job errors with stable codes: what a client can match on, never a traceback."""

from __future__ import annotations


class JobError(Exception):
    """An error a client sees as `<code>: <field>: <rule>` (field omitted when none applies).

    Codes are stable API: invalid_input, mode_unavailable, workflow_unavailable,
    payload_too_large, generation_failed, out_of_memory, cancelled, internal_error.
    """

    def __init__(self, code: str, rule: str, field: str | None = None) -> None:
        self.code = code
        self.field = field
        self.rule = rule
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.code}: {self.field}: {self.rule}" if self.field else f"{self.code}: {self.rule}"
