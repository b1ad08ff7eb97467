"""The model zoo: the seven models of the Cocktailer paper (OSDI'23), at the paper's sizes.

Every module `models.<name>` offers the same interface:

    Config, small()                       full-size configuration (models.md) and a seconds-on-interpret one
    init_weights(cfg, seed=0)             dict[str, np.ndarray], float32
    make_inputs(cfg, batch, seed=0, ...)  seeded synthetic inputs (dict of arrays)
    reference(weights, inputs, cfg)       plain numpy oracle (float64 inside)
    forward(weights, inputs, cfg)         the gdsl program; make_forward(cfg, backend, control) jits it
    torch_eager / torch_cudagraph / torch_compile / jax_jit (weights, cfg, batches, device=None)
                                          baselines as common.Runner (BaselineUnavailable if they cannot run);
                                          lstm also torch_cudnn / torch_cudnn_graph (torch.nn.LSTM on cuDNN)
    from_state_dict(sd, cfg)              weights from the PyTorch twin's state_dict (keys in the docstring)
    overhead_test(cfg)                    the control-flow overhead test: the computation as programs with and
                                          without control flow, each a configuration (common.OverheadTest)
    BATCHES                               the batch sizes of the paper's evaluation

`python -m models.<name> --small --check --backend interpret` runs one; `python -m models.bench` compares.
"""
import importlib

MODELS = ("lstm", "nasrnn", "attention", "seq2seq", "blockdrop", "skipnet", "rae")


def load(name: str):
    """The module of one model, by name (imports gdsl)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; the zoo has {', '.join(MODELS)}")
    return importlib.import_module(f"models.{name}")
