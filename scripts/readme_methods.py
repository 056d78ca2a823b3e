"""Rewrite the README's method table from the method registry (``fastdd.methods.markdown_table``).

    python scripts/readme_methods.py          # rewrite README.md in place
    python scripts/readme_methods.py --check  # exit 1 when the table is stale (tests/test_methods.py)

The table sits between the ``<!-- methods: begin -->`` and ``<!-- methods: end -->`` markers.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastdd.files import atomic_write  # noqa: E402
from fastdd.methods import markdown_table  # noqa: E402

BEGIN, END = "<!-- methods: begin (scripts/readme_methods.py writes this table) -->", "<!-- methods: end -->"


def render(readme: str) -> str:
    """``readme`` with the block between the markers replaced by the registry's table."""
    start, stop = readme.find(BEGIN), readme.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"the README has no {BEGIN!r} ... {END!r} block")
    return readme[:start + len(BEGIN)] + "\n" + markdown_table() + readme[stop:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 if the table is stale")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args()
    text = args.readme.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: the method table is stale; run python scripts/readme_methods.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with atomic_write(args.readme, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
