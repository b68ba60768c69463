"""lightning-transfer: transfer learning for image classification with Lightning and Hydra."""
