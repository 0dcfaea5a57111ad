"""What message signing costs: µs per message to sign (sender) and verify (worker), by body size.

    .venv/bin/python -m benchmarks.signing

Compared, in the same process, with what a worker does to every message anyway (decode and
check it), so the figure reads as a share of work already done.
"""

from __future__ import annotations

import statistics
import timeit

from dagster_taskiq_sync._dagster.names import KnownExecutionState, serialize_value
from dagster_taskiq_sync.wire.messages import Keyring, StepMessage, decode, encode


def _body(size_hint: int) -> bytes:
    # A known state whose retry counts make the body about size_hint bytes (a big fan-out's is large).
    keys = {f"op_{i:06d}": 0 for i in range(max(0, size_hint // 24))}
    state = serialize_value(KnownExecutionState(previous_retry_attempts=keys))
    return encode(StepMessage("0b6f9c7e-6a43-4c1e-9d55-3c2f9a1d2b10", "emit_one", 1, state), "dagster")


def measure(number: int = 2000) -> list[dict[str, float]]:
    ring = Keyring.from_secrets("k" * 64)
    rows = []
    for hint in (0, 4_000, 100_000):
        body = _body(hint)
        attributes = ring.sign(body)
        n = max(20, number // (1 + len(body) // 2000))
        sign = min(timeit.repeat(lambda b=body: ring.sign(b), number=n, repeat=5)) / n * 1e6
        verify = min(timeit.repeat(lambda b=body, a=attributes: ring.verify(b, a), number=n, repeat=5)) / n * 1e6
        dec = min(timeit.repeat(lambda b=body: decode(b), number=max(5, n // 10), repeat=3)) / max(5, n // 10) * 1e6
        rows.append({"bytes": len(body), "sign_us": sign, "verify_us": verify, "decode_us": dec})
    return rows


def main() -> None:
    rows = measure()
    print("| body bytes | sign (µs) | verify (µs) | decode + checks (µs) | verify / decode |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['bytes']} | {row['sign_us']:.1f} | {row['verify_us']:.1f} | {row['decode_us']:.1f} | "
            f"{row['verify_us'] / row['decode_us']:.2f}x |"
        )
    print(f"median verify share of decode: {statistics.median(r['verify_us'] / r['decode_us'] for r in rows):.2f}x")


if __name__ == "__main__":
    main()
