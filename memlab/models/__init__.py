"""Models: speaker-embedding nets (ResNet, DF-ResNet and their memory variants) and a Transducer."""

from memlab.models.resnet import ResNet
from memlab.models.dfresnet import DFResNet
from memlab.models.heads import AAMSoftmax
from memlab.models.transducer import Transducer

__all__ = ["ResNet", "DFResNet", "AAMSoftmax", "Transducer"]
