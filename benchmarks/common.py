"""What the benchmark scripts share: the report format and the fraud scoring stages."""

from __future__ import annotations

import statistics

#: The demo's scoring between a source and a sink, as the benchmarks run it (a YAML
#: fragment to format with ``model`` and ``version``): decode, per-card features, the
#: model with batches formed while it is busy, the decision.
FRAUD_SCORING = """
decode: {{schema: "rtinfer.demo.events:Transaction", event_time_field: ts}}
stages:
  - {{type: python, use: "rtinfer.demo.features:HandCardFeatures", args: {{capacity: 32768}}}}
model:
  path: "{model}"
  version: "{version}"
  batching: {{max_batch_size: 1024, max_delay_ms: 0}}
decision:
  output: probabilities
  thresholds: {{review: 0.3, block: 0.8}}
  include: [card, amount]
"""


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """The median of ``values`` and their range: ``"12,345 (11,000-13,010)"``."""
    if not values:
        return "-"
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))}-{fmt.format(max(values))})"
    )
