"""Complete DALI pipeline definitions: ImageNet-style training/validation and CIFAR-sized."""
