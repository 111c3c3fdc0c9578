"""Thin job entrypoints: `python -m ray_jobs.<stage> --preset NAME --out DIR [--<field> VALUE ...]`.

Each parses the shared command line (`mono.cli`), calls `mono.<stage>.run(cfg)` and prints
where the output went. `ray.init()` happens only under `__main__`, handed to `main` as
`init` and called after the arguments parse, so `--help` and a bad flag answer at once: inside
`ray job submit` it joins the cluster, on a laptop it starts a local one.
"""
