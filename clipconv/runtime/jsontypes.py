"""Type aliases for JSON-like data: metrics, summaries, run records, table rows, checkpoint metadata.

Annotation-only: values typed `JSON` are what `json.dumps` accepts (after the writers' own conversions).
"""

from __future__ import annotations

from typing import Union

JSON = Union[None, bool, int, float, str, list["JSON"], dict[str, "JSON"]]
JSONObject = dict[str, JSON]
