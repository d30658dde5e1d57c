"""One module per figure; each exposes ``run(env, sizes) -> list[Row]``."""
