"""``python -m cta_cli ...`` is ``cta ...`` (how components start `cta serve` and `cta train`
as processes: the interpreter of the running environment, no console script needed)."""

from cta_cli.main import main

if __name__ == "__main__":
    main(prog_name="cta")
