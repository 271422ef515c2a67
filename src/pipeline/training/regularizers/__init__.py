"""Regularizers, one registry entry per kind, each owning one key of the `regularizer:` block.

| key | module | acts on |
|---|---|---|
| dropout, conv_dropout, batch_norm | model_options | the model builder (a keyword of it) |
| l1, l2, elastic | loss | the loss (an added term, logged as train/loss_<key>) |
| label_smoothing | loss | the cross-entropy (a keyword of it) |
| weight_decay | weight_decay | each optimizer step (decoupled) |
| early_stopping | early_stopping | a Lightning callback |
| augment | augment | training batches |
| tta | tta | evaluation (averaged views) |

Adding one takes two files:
1. a `Regularizer` subclass registered with `@register_regularizer("<key>", default=<off>)`,
   with its `check` and the hooks where it acts (`registry.HOOKS`); `pbt_mutable=True` if a
   restored checkpoint can take a new value. In a module of its own here, that module also
   gets one import line below; beside its kind (e.g. in `loss.py`) it needs none.
2. `conf/regularizer/<name>.yaml` setting `<key>: <value>`, so `regularizer=[<name>,...]`
   switches it on.
The default must be the value that changes nothing, so every existing config, checkpoint
and `regularizer=none` keep their meaning.

`prepare` fills the default into every config that leaves the key out, so validation,
training, evaluation, sweeps (`tune.space.regularizer.<key>`, `tune.pbt.mutate`), the saved
config and the logged parameters all see it without conf/config.yaml listing it. What a user
still has to know while it is not listed there: a command-line value needs the option
selected (`regularizer=[<name>] regularizer.<key>=...`) or a `+` (`+regularizer.<key>=...`),
and params.yaml (DVC's copy of the default composition) lacks the key. Listing it in
conf/config.yaml's block (then `make params`) is optional and makes it a plain override like
the built-in keys, which are all listed there (a test checks those values are the defaults).
A regularizer acting where no hook exists yet (e.g. after the optimizer step, as max-norm
does) needs that hook added to `Regularizer` and `Regularizers` and called once in
`training/module.py`. A run saved with a key no entry owns (a checkpoint, an MLflow
config.yaml) is refused with ConfigError naming the key, as an unknown model name is.
"""

# Importing the entry modules runs their @register_regularizer decorators.
from pipeline.training.regularizers import (  # noqa: F401
    augment,
    early_stopping,
    loss,
    model_options,
    tta,
    weight_decay,
)
from pipeline.training.regularizers.loss import penalized_parameters, penalties
from pipeline.training.regularizers.registry import (
    HOOKS,
    Regularizer,
    Regularizers,
    check_regularizers,
    complete,
    list_regularizers,
    pbt_mutable_keys,
    register_regularizer,
    regularizer_defaults,
)
from pipeline.training.regularizers.tta import TTA, tta_probabilities
from pipeline.training.regularizers.weight_decay import decoupled_weight_decay

__all__ = [
    "HOOKS",
    "TTA",
    "Regularizer",
    "Regularizers",
    "check_regularizers",
    "complete",
    "decoupled_weight_decay",
    "list_regularizers",
    "pbt_mutable_keys",
    "penalized_parameters",
    "penalties",
    "register_regularizer",
    "regularizer_defaults",
    "tta_probabilities",
]
