"""A DST method of your own in a few lines: drop by |w * grad| (a first-order saliency), grow by |grad| like RigL.

Shown in docs/extending.md and run by the test suite.
"""

import dataclasses

import torch
from torch import nn

import dst_prune


@dst_prune.register_method("saliency_rigl")
@dataclasses.dataclass(eq=False, kw_only=True)
class SaliencyRigL(dst_prune.DropAndGrow):
    """RigL's growth; drop the active weights whose |w * dL/dw| is smallest (Molchanov et al. 2019, eq. 8)."""

    grows_by = "gradient"  # dL/dW of the step before each update: self.gradients; grown where it is largest
    decay: str = "cosine"  # a hyperparameter of DropAndGrow, with this method's default

    def drop_scores(self, layer: int) -> torch.Tensor:
        target = self.targets[layer]
        return target.scores(target.orig * self.gradients[layer])


model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
dst = dst_prune.apply(model, sparsity=0.9, method="saliency_rigl", optimizer=optimizer, update_every=5,
                      total_steps=40, dense_stem_and_head=False, drop_fraction=0.3)
for _ in range(40):
    x = torch.randn(16, 32)
    loss = nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    dst.step()
print(dst.sum_table)
print(f"{dst.update_index} updates, {sum(sum(r['grown']) for r in dst.history)} weights regrown")
