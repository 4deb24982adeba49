"""Drop-in modules: subclasses of the torch modules they replace, with the same
constructor signatures (plus the fused op's own arguments), so ``state_dict``,
``isinstance``, initialisation and ``repr`` behave like torch's."""

from __future__ import annotations

import torch
from torch import nn

from . import functional
