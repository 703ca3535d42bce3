r"""Deep linear network on synthetic Gaussian regression (Santurkar et al. 2018, sec. 3.2
and app. B): y = W* x + noise, a stack of linear layers trained with SGD on squared error.

    bn-research train --config configs/deep_linear.py:norm=batch --workdir runs/dln_bn

Runtime: under a minute on a 2-core CPU for the default 2,000 steps. Expected result:
the test loss falls towards the noise floor 0.5 * dim_out * noise_std^2 = 0.05.
Argument keys: norm, depth, width, steps, lr, seed (or any dotted key).
"""

from bn_research import config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    c.dataset.name = "gaussian_regression"  # synthetic teacher W*, x ~ N(0, I)
    c.dataset.dim_in = 100  # input dimension
    c.dataset.dim_out = 10  # output dimension
    c.dataset.noise_std = 0.1  # label noise: test-loss floor 0.5 * 10 * 0.01 = 0.05
    c.model.name = "deep_linear"  # identity activations
    c.model.depth = 10  # hidden linear layers
    c.model.width = 100  # units per hidden layer
    c.model.activation = "linear"  # required by deep_linear
    c.model.norm = "none"  # the paper compares none vs batch
    c.optimizer.name = "sgd"  # plain SGD
    c.optimizer.learning_rate = 0.01  # small enough for the no-BN network to train
    c.train.batch_size = 128  # examples per step
    c.train.num_steps = 2000  # about 60 epochs of 4,096 examples
    c.train.eval_every = 500  # test loss every 500 steps
    c.train.log_every = 100  # training loss every 100 steps
    return config_lib.apply_arg(c, arg, config_lib.ALIASES)
