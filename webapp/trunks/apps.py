from django.apps import AppConfig


class TrunksConfig(AppConfig):
    name = "webapp.trunks"
    label = "trunks"
