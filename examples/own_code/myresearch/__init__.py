"""Your own code for nanogpt, named in config by `_target_` (nanogpt's docs/extend.md).

optim.py: the Lion optimizer and an inverse-square-root schedule; model.py: a GPT whose MLP is
SwiGLU; tasks.py: a multiple-choice task made from a text (which line comes next). The options
that name them are in ../conf, the config folder a command adds with --config-dir.
"""
