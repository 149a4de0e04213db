from django.urls import path

from . import views

app_name = "playground"
urlpatterns = [
    path("", views.playground, name="index"),
    path("generations/<int:pk>/stop/", views.stop, name="stop"),
]
