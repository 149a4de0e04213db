from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "webapp.accounts"
    label = "accounts"

    def ready(self) -> None:
        # The admin's log-in is throttled like the site's: its form, and 429 during a lockout. Set
        # here, before the URLs are built: the admin site's URL for "login/" is its login attribute.
        from django.contrib import admin

        from .forms import ThrottledAdminAuthenticationForm
        from .views import refuse_when_locked_out

        admin.site.login_form = ThrottledAdminAuthenticationForm
        admin.site.login = refuse_when_locked_out(admin.site.login)
