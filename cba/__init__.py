"""cba: backdoor attacks on contrastive self-supervised learning, and defenses against them."""

__version__ = "0.1.0"
