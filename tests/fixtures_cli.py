"""Shared by the CLI error tests: a tiny upstream YAML and the one-line-error check."""

# A tiny image model as an upstream YAML `arguments:` list (the text width comes from the checkpoint).
ARGS = [{"img_size": 32}, {"vae": "stabilityai/sd-vae-ft-ema"}, {"txt_size": 6}, {"channel_size": 4},
        {"patch_size": 1}, {"channels": 64}, {"head_dim": 32}, {"layers_per_block": "1 0 1 2"}, {"rope": 1},
        {"sos": 1}, {"seq_order": "L2R"}, {"use_softplus": 1}, {"cond_top_only": 1}, {"use_final_norm": 1},
        {"soft_clip": 4}]


def one_line(res) -> str:
    """The single ``error:`` line a failed command printed (exit 1), or an assertion failure."""
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]
