"""Training code of sd_zoo (not part of the installed package): the shared engine, data, recipes and the
``cifar.py`` / ``imagenet.py`` scripts. Needs the ``train`` extra: ``pip install "sd_zoo[train]"``."""
