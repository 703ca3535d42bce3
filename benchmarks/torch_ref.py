"""PyTorch eager training loops equivalent to `configs/mlp.py` and `configs/cnn.py`:
same layers (no bias before batch norm; batch norm momentum 0.01 = 1 - 0.99 in the
framework's convention; eps 1e-5), batch size, optimizer and schedule. The CNN runs in
channels_last memory format. Data live in memory as tensors; epoch-wise `randperm`.

`Loop(..., compiled=True)` is the same model and step under `torch.compile` (inductor,
default mode, static shapes): the forward pass with the loss (and so, through AOT
autograd, its backward) is one compiled function and the optimizer step another, the
usual recipe; the learning rate is then a tensor so that the cosine schedule does not
recompile the optimizer step. Batch gathering, `zero_grad` and `backward()` are the same
calls as in eager mode. Compilation happens on the first steps (`run(5)` warms up).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def _mlp(fan_in, width, depth, out):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width, bias=False), nn.BatchNorm1d(width, eps=1e-5, momentum=0.01), nn.Sigmoid()]
        fan_in = width
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(fan_in, out))


def _cnn(channels, width, depth, out, size):
    layers = []
    for i in range(depth):
        c_out = width * 2 ** (i // 2)
        layers += [nn.Conv2d(channels, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.01), nn.ReLU()]
        channels = c_out
        if i % 2 == 1 and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out))


class Loop:
    """`run(num_steps)` trains in place; `step()` is one optimizer step."""

    def __init__(self, kind, config, x_nhwc: np.ndarray, y: np.ndarray, num_classes: int, threads=2, seed=0,
                 compiled: bool = False):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        m, o = config.model, config.optimizer
        if kind == "mlp":
            self.model = _mlp(int(np.prod(x_nhwc.shape[1:])), m.width, m.depth, num_classes)
            self.x = torch.from_numpy(np.ascontiguousarray(x_nhwc))
        else:
            self.model = _cnn(x_nhwc.shape[-1], m.width, m.depth, num_classes, x_nhwc.shape[1])
            self.model = self.model.to(memory_format=torch.channels_last)
            nchw = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
            self.x = nchw.contiguous(memory_format=torch.channels_last)
        self.y = torch.from_numpy(y.astype(np.int64))
        self.channels_last = kind != "mlp"
        self.model.train()
        self.compiled = compiled
        lr = torch.tensor(float(o.learning_rate)) if compiled else o.learning_rate
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr,
                                   momentum=o.momentum if o.name == "momentum" else 0.0)
        self.peak, self.cosine, self.total = o.learning_rate, o.schedule == "cosine", config.train.num_steps
        self.b, self.n, self.t = config.train.batch_size, self.x.shape[0], 0
        self.per_epoch = self.n // self.b
        self.loss_fn = nn.CrossEntropyLoss()
        self.forward_loss = self._forward_loss
        self.opt_step = self.opt.step
        if compiled:
            self.forward_loss = torch.compile(self._forward_loss, dynamic=False)
            self.opt_step = torch.compile(self._opt_step, dynamic=False)

    def _forward_loss(self, xb, yb):
        return self.loss_fn(self.model(xb), yb)

    def _opt_step(self):
        self.opt.step()

    def step(self):
        pos = self.t % self.per_epoch
        if pos == 0:
            self.perm = torch.randperm(self.n)
        idx = self.perm[pos * self.b:(pos + 1) * self.b]
        xb = self.x[idx]
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if self.cosine:
            frac = min(self.t, self.total) / self.total
            lr = 0.5 * self.peak * (1 + math.cos(math.pi * frac))
            for g in self.opt.param_groups:
                if self.compiled:
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_loss(xb, self.y[idx])
        loss.backward()
        self.opt_step()
        self.t += 1
        return loss

    def run(self, num_steps):
        for _ in range(num_steps):
            loss = self.step()
        return float(loss.detach())


def serve(conn, kind, config_dict, compiled, steps):
    """A PyTorch peer in its own process (`benchmarks/run.py`): loads the config's dataset
    (through `bn_research.data`, as the framework does), builds the loop, warms it up
    (compiles), answers ('ready', None) or ('error', line); then each 'run' message with
    the steps/s of `steps` more steps, until anything else or a closed pipe."""
    import time

    import ml_collections

    from bn_research import data

    try:
        config = ml_collections.ConfigDict(config_dict)
        ds = data.load(config.dataset)
        loop = Loop(kind, config, np.asarray(ds.train["x"]), np.asarray(ds.train["y"]), ds.output_dim,
                    compiled=compiled)
        loss = loop.run(5)
        if not math.isfinite(loss):
            raise RuntimeError(f"warm-up loss is {loss}")
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        conn.send(("error", f"{type(e).__name__}: {first}"[:200]))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg != "run":
            return
        t = time.perf_counter()
        loop.run(steps)
        conn.send(steps / (time.perf_counter() - t))
