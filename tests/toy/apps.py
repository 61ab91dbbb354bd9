from django.apps import AppConfig


class ToyConfig(AppConfig):
    name = "tests.toy"
    label = "toy"
    verbose_name = "Toy saga (tests only)"
