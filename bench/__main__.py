"""`python -m bench`: configure Django for the bench stack, then run every section."""

import os

import django

from .stack import environment

os.environ.update(environment())
django.setup()

from .run import main  # noqa: E402 - the sections import models, which need django.setup()

main()
