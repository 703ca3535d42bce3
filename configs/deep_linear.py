r"""Deep linear network on synthetic Gaussian regression (Santurkar et al. 2018, sec. 3.2
and app. A.1(2)): y = W* x (+ noise), a stack of linear layers trained by SGD on squared
error.

    bn-research train --config configs/deep_linear.py:norm=batch --workdir runs/dln_bn
    bn-research train --config configs/deep_linear.py:paper,norm=batch --workdir runs/dln_paper_bn

Runtime: under a minute on a 2-core CPU for the default 2,000 steps. Expected result:
the test loss falls towards the noise floor 0.5 * dim_out * noise_std^2 = 0.05.
Argument keys: norm, depth, width, steps, lr, seed (or any dotted key), and the bare word
`paper` for the paper's setting (below).

`paper`: Santurkar et al. 2018, app. A.1(2): k = 25 square 10x10 matrices (24 hidden
layers + the head) fitting a 10x10 Gaussian matrix A (y = A x, no noise) on 1,000
Gaussian inputs, full-batch gradient descent (batch = dataset), 10,000 steps, learning
rate 1e-6, Glorot init. Choices where the paper is silent or the framework differs:
- loss: the paper's ||W_1...W_k x - A x||^2 is read as a sum over the 1,000 examples; this
  framework minimizes 0.5 * mean over examples, i.e. the paper's loss / (2 N), so gradient
  descent at rate eta on the paper's loss is gradient descent at rate 2 N eta here:
  `optimizer.learning_rate` = PAPER_LR * 2 * num_train = 2e-3 (a mean loss would make
  1e-6 too small to train in 10,000 steps, which the paper's tuned rate was not);
- A has i.i.d. N(0, 1/10) entries (the dataset's teacher; the paper: "i.i.d. Gaussian");
- init: LeCun normal, std 1/sqrt(10), which for square layers is Glorot normal;
- the layers without batch norm keep a zero-initialized bias (the inputs are centred);
- batch norm with its affine gamma/beta on every hidden layer, before the (identity)
  activation; the head is a plain linear map.
"""

from bn_research import config_lib

PAPER_LR = 1e-6  # Santurkar et al. 2018, app. A.1(2), on their (summed) squared error


def paper_rate(lr: float, num_train: int) -> float:
    """Rate here equal to gradient descent at `lr` on the paper's summed squared error:
    sum_n ||f(x_n) - y_n||^2 = 2 N * (0.5 * mean_n ||f(x_n) - y_n||^2)."""
    return lr * 2 * num_train


def get_config(arg=None):
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    paper = "paper" in items
    arg = ",".join(s for s in items if s != "paper")
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
    if paper:
        _paper(c)
    return config_lib.apply_arg(c, arg, config_lib.ALIASES)


def _paper(c):
    """Santurkar et al. 2018, app. A.1(2); see the module docstring for the choices."""
    c.dataset.dim_in = 10  # A is 10x10
    c.dataset.dim_out = 10
    c.dataset.num_train = 1000  # 1,000 Gaussian inputs
    c.dataset.num_test = 1000
    c.dataset.noise_std = 0.0  # y = A x exactly
    c.model.depth = 24  # 24 hidden 10x10 layers + the 10x10 head = k = 25 matrices
    c.model.width = 10  # square layers of width 10
    c.model.init_scale = 1.0  # LeCun normal 1/sqrt(10) = Glorot normal for square layers
    c.optimizer.learning_rate = paper_rate(PAPER_LR, c.dataset.num_train)  # 2e-3 on the mean loss
    c.train.batch_size = 1000  # full batch: gradient descent
    c.train.num_steps = 10000  # as in the paper
    c.train.eval_every = 1000  # test loss every 1,000 steps
    c.train.log_every = 100  # training loss every 100 steps
    c.train.eval_batch_size = 1000  # one evaluation batch
