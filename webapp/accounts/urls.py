from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

urlpatterns = [
    path("login/", views.login_page, name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", views.signup, name="signup"),
    path("invite/", views.invite, name="invite"),
    path("invite/<uidb64>/<token>/", views.invite_accept, name="invite-accept"),
]
