from django.urls import path

from . import views

app_name = "trunks"
urlpatterns = [
    path("", views.fleet_page, name="fleet"),
    path("<int:pk>/<slug:action>/", views.fleet_action, name="fleet-action"),
]
