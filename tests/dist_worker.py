"""One rank of the 2-process test in ``test_distributed.py`` (run by ``torchrun``, not by pytest).

Each rank builds a sampler with no shard arguments (they come from ``torch.distributed``), records
the files its decoder reads over two reader epochs, and takes training steps that end in an
``all_reduce`` (so the ranks must stay in lockstep), then writes what it saw as JSON.
"""

import json
import sys

import torch
import torch.distributed as dist

from dali_patches import PatchSampler
from dali_patches.torch import PatchIterator

STEPS = 12


def main(images: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sampler = PatchSampler(images, patch_size=32, batch_size=8, reuse=1, cache_images=10, device="cpu", seed=5)
    decoder = sampler._producer.maker.decoder
    decoded: list[int] = []
    original = decoder.next

    def recording_next():
        item = original()
        decoded.append(int(item[0]))
        return item

    decoder.next = recording_next
    shard_size = decoder.shard_size
    while len(decoded) < 2 * shard_size:  # two reader epochs of this shard
        next(sampler)
    epochs = [decoded[:shard_size], decoded[shard_size: 2 * shard_size]]
    torch.manual_seed(0)  # same initial weights on every rank, as DDP would broadcast them
    model = torch.nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for step, data in enumerate(PatchIterator(sampler)):
        if step == STEPS:
            break
        x = data["patches"].permute(0, 3, 1, 2).float() / 255
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # DDP's gradient averaging, by hand: a collective every step
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        optimizer.step()
        losses.append(float(loss))
    checksum = torch.cat([p.detach().flatten() for p in model.parameters()]).sum()
    result = {"rank": rank, "world": dist.get_world_size(), "shard_id": sampler.config.shard_id,
              "num_shards": sampler.config.num_shards, "epochs": epochs, "steps": len(losses),
              "weights_checksum": float(checksum), "files": list(sampler.files)}
    sampler.close()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
