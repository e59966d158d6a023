"""The tools the ``parallelspec`` command runs: the CLI (``cli``), the end-to-end benchmark
(``bench``), drafter export (``export``) and training (``training``). The runtime (engine, trees,
drafters, hf) never imports from here."""
