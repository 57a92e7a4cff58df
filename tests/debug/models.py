"""A small model with repeated blocks, one linear of which runs under autocast (mixed dtypes)."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        h = self.up(x).relu()
        # a mixed-precision linear: bf16 weights stay bf16, activations arrive in fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.down.weight.dtype == torch.bfloat16):
            y = self.down(h)
        return x + y.float()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def planned_net(sparsity: float = 0.5, bf16_down: bool = False) -> Net:
    """Net with a calibrated plan attached; ``bf16_down``: blocks.1.down keeps bf16 weights."""
    import wisparse_compile as wsc

    torch.manual_seed(0)
    net = Net().eval()
    g = torch.Generator().manual_seed(1)
    plan = wsc.calibrate(net, [torch.randn(8, 16, generator=g) for _ in range(2)], wsc.SparsityConfig(sparsity=sparsity))
    if bf16_down:
        down = net.blocks[1].down
        down.weight.data = down.weight.data.to(torch.bfloat16)  # same Parameter object: stays planned
        down.bias.data = down.bias.data.to(torch.bfloat16)
    wsc.attach(net, plan)
    return net
