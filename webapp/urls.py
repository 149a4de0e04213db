"""URLs: pages per app, the JSON API under /api/, the admin, Prometheus's /metrics."""

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.utils.functional import lazy
from django.views.generic import RedirectView

from .metrics import metrics_view

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="training:job-list", permanent=False)),
    path("accounts/", include("webapp.accounts.urls")),
    path("datasets/", include("webapp.datasets.urls")),
    path("jobs/", include("webapp.training.urls")),
    path("playground/", include("webapp.playground.urls")),
    path("fleet/", include("webapp.trunks.urls")),
    path("api/", include("webapp.api_urls")),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view),  # Prometheus; staff only, 404 for everyone else
    # Browsers ask for /favicon.ico whatever the page links; the icon is an SVG among the static files.
    path("favicon.ico", RedirectView.as_view(url=lazy(static, str)("favicon.svg"), permanent=False)),
]

# Pages in the site's layout for browsers, JSON for API clients (webapp/error_pages.py).
handler400 = "webapp.error_pages.bad_request"
handler403 = "webapp.error_pages.permission_denied"
handler404 = "webapp.error_pages.page_not_found"
handler500 = "webapp.error_pages.server_error"
