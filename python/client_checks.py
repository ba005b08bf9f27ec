"""What the official-client tests (test_openai_client.py, test_anthropic_client.py) share: the
list of checks a `@check` decorator fills, and a runner that gives each check the client and
the model, reports every check and exits non-zero if one failed (`N passed, M failed`)."""

import argparse
import sys

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def main(make_client, api_key_required=False):
    """Parses --base-url, --model and --api-key, builds the client with
    `make_client(base_url, api_key)` and runs every check."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", required=api_key_required, default="none")
    a = ap.parse_args()
    c = make_client(a.base_url, a.api_key)
    failed = 0
    for fn in CHECKS:
        try:
            fn(c, a.model)
            print(f"ok   {fn.__name__}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
