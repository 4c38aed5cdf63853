"""Schemathesis hooks for .ci/schemathesis.sh.

No worker runs during the fuzzing, so a provision or deprovision waits out its whole `wait_ms`;
valid waits are shortened to keep the run short. Invalid ones (out of range, not a number) are
sent as generated, so their rejection is still checked.
"""

import schemathesis

SHORTEST = 50


@schemathesis.hook
def before_call(context, case, **kwargs):
    query = case.query or {}
    raw = query.get("wait_ms")
    try:
        wait = int(raw)
    except (TypeError, ValueError):
        return
    if str(raw).strip() == str(wait) and 0 <= wait <= 30000:
        query["wait_ms"] = min(wait, SHORTEST)
