"""``visage`` on the GPU machine, with dlib's network from the payload's float16 weights: its .dat file (and
``face_recognition_models``) stay here. Usage: python -m torch.distributed.run ... bench/gpu/launch.py train ..."""

from __future__ import annotations

import sys

import torch
from payload import PAYLOAD

import training.loop
from model.console import main
from training.dlib_resnet import DlibResNet


def load_teacher_net(device: torch.device) -> torch.nn.Module:
    net = DlibResNet()
    state = torch.load(PAYLOAD / "teacher16.pt")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval().to(device, memory_format=torch.channels_last).requires_grad_(False)


if __name__ == "__main__":
    training.loop.load_teacher_net = load_teacher_net
    sys.exit(main(sys.argv[1:]))
