"""The seed's command, verbatim, from the repository root:
`torchrun --nproc_per_node 2 -m examples.run_pa --model_path PATH` runs pdmix.run_pa."""

from pdmix.run_pa import main

if __name__ == "__main__":
    raise SystemExit(main())
