"""This repository's model cards (``hub_cards/``) and the records of the weights trained here, checked against the
committed runs.

Repository tooling, not part of the installed package: run it from the root of a checkout.

    python -m tools.cards            # rewrite hub_cards/ from sd_zoo/pretrained.py
    python -m tools.cards --check    # fail when a card is stale, or a record's numbers differ from its run

A weight trained by this project carries its figures, recipe and constant-depth comparison in its record (so the
installed package renders its card without the repository); ``--check`` rebuilds them from the run folders the
record names (``run_dir``, ``baseline_run_dir``) and reports every difference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from sd_zoo.cards import read_results, recipe_from_run, run_figures, run_result
from sd_zoo.pretrained import PublishedWeight, published_weights
from sd_zoo.publishing import render_all_cards

ROOT = Path(__file__).resolve().parents[1]
CARD_DIR = ROOT / 'hub_cards'


def record_mismatches(weight: PublishedWeight, root: Path = ROOT) -> List[str]:
    """How ``weight``'s record differs from its committed run(s); empty when it agrees or names no run."""
    if not weight.run_dir:
        return []
    results = read_results(root / weight.run_dir)
    expected = {'results': tuple(run_figures(weight, results)), 'recipe': tuple(recipe_from_run(results))}
    if weight.baseline_run_dir:
        baseline = read_results(root / weight.baseline_run_dir)
        expected['comparison'] = (run_result(weight.run_dir, results), run_result(weight.baseline_run_dir, baseline))
    return [f'{weight.name}.{field}: record {getattr(weight, field)!r}, run {value!r}'
            for field, value in expected.items() if getattr(weight, field) != value]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=CARD_DIR, help='folder of the cards (default: hub_cards/)')
    parser.add_argument('--check', action='store_true', help='only check: fail on a stale card or a record '
                        'that differs from its run')
    args = parser.parse_args(argv)
    mismatches = [line for weight in published_weights() for line in record_mismatches(weight)]
    for line in mismatches:
        print(f'record differs from its run: {line}', file=sys.stderr)
    stale = render_all_cards(args.out, check=args.check)
    print(('stale: ' if args.check else 'written: ') + (', '.join(stale) or 'none'))
    return 1 if mismatches or (args.check and stale) else 0


if __name__ == '__main__':
    sys.exit(main())
