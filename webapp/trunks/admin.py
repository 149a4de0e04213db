"""Admin for trunk servers: status at a glance, a check on every save that touches the connection,
'Check now', and a token that is never shown back. The fleet page (/fleet/) is the live view."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.template.loader import render_to_string
from django.utils.html import format_html
from django.utils.text import Truncator

from . import fleet
from .actions import describe_check
from .health import HEALTH_FIELDS, check_trunk, check_trunks
from .models import BUDGET_FIELDS, TrunkServer

TOKEN_HELP_NEW = "The bearer token the trunk server was started with (its TRUNK_TOKEN). It is never shown again."
TOKEN_HELP_EDIT = ("The bearer token the trunk server was started with (its TRUNK_TOKEN). It is never shown: "
                   "leave this blank to keep the current token, or enter a new one to replace it.")
# Shown for a figure the trunk did not report (one from before it).
NOT_REPORTED = "not reported"
# Changing any of these makes the last check's result meaningless.
CONNECTION_FIELDS = ("address", "token", "use_tls", "tls_ca_certificate")

STATUS_COLORS = {
    TrunkServer.Status.UP: "#1a7f37",
    TrunkServer.Status.DOWN: "#cf222e",
    TrunkServer.Status.UNKNOWN: "#6e7781",
    "draining": "#9a6700",
    "disabled": "#6e7781",
}


class TrunkServerForm(forms.ModelForm):
    token = forms.CharField(required=False, strip=True, widget=forms.PasswordInput(render_value=False),
                            help_text=TOKEN_HELP_NEW)

    class Meta:
        model = TrunkServer
        fields = ["name", "address", "token", "use_tls", "tls_ca_certificate", "enabled"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The stored token is not an initial value: it never reaches the page, and a blank
        # field on edit does not count as a change (nor appear as one in the history).
        self.initial["token"] = ""
        if self.instance.pk:
            self.fields["token"].help_text = TOKEN_HELP_EDIT

    def clean_token(self) -> str:
        token = self.cleaned_data.get("token", "")
        if token:
            return token
        if self.instance.pk:
            return TrunkServer.objects.values_list("token", flat=True).get(pk=self.instance.pk)
        raise forms.ValidationError("Enter the trunk server's token: every call except the health check needs it.")


@admin.register(TrunkServer)
class TrunkServerAdmin(admin.ModelAdmin):
    form = TrunkServerForm
    # Few, short columns that wrap (static/css/admin_trunks.css): the list fits a 1280 px screen beside the
    # admin's menu and the filters; the fleet page shows the rest.
    list_display = ("name_and_address", "status_badge", "model_id", "sessions", "latency", "last_check",
                    "short_error")
    list_display_links = ("name_and_address",)
    list_filter = ("status", "enabled", "draining")
    search_fields = ("name", "address", "model_id")
    actions = ("check_now", "enable", "disable")
    readonly_fields = ("status_badge", "latency", "last_check", "layers", "cuts", "sessions", "device_and_dtype",
                       "memory") + tuple(
        field for field in HEALTH_FIELDS if field not in ("status", "latency_ms"))
    fieldsets = (
        (None, {"fields": ("name", "address", "token", "use_tls", "tls_ca_certificate", "enabled"),
                "description": "Saving a new trunk, or a change of its address, token or TLS settings, checks it "
                               "at once and says what it found."}),
        ("Health", {
            "classes": ("collapse",),
            "description": "Filled by the health checks (every few seconds by Celery beat, or 'Check now').",
            "fields": ("status_badge", "latency", "last_check", "last_error", "model_id", "model_type",
                       "weights_fingerprint", "layers", "num_layers", "trunk_start", "trunk_end", "cuts",
                       "min_trunk_start", "max_trunk_end", "hidden_size",
                       "sessions", "max_sessions", "active_sessions", "version", "device_and_dtype", "memory"),
        }),
        ("Per-session budgets", {
            "classes": ("collapse",),
            "description": "What one session may ask of the trunk; it refuses more. Empty: not reported "
                           "(a trunk from before these budgets).",
            "fields": BUDGET_FIELDS,
        }),
    )

    # ------------------------------------------------------------ columns

    @admin.display(description="cuts sessions may choose")
    def cuts(self, trunk: TrunkServer) -> str:
        return trunk.cut_bounds or "the default cut only"

    @admin.display(description="trunk server", ordering="name")
    def name_and_address(self, trunk: TrunkServer) -> str:
        return format_html('{}<br><code class="trunk-address">{}</code>', trunk.name, trunk.address)

    @admin.display(description="status", ordering="status")
    def status_badge(self, trunk: TrunkServer) -> str:
        return format_html(
            '<span style="display:inline-block;padding:1px 8px;border-radius:8px;color:#fff;'
            'background:{};font-weight:bold">{}</span>',
            STATUS_COLORS.get(trunk.fleet_status, STATUS_COLORS[TrunkServer.Status.UNKNOWN]), trunk.fleet_status,
        )

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, trunk: TrunkServer) -> str:
        return "-" if trunk.latency_ms is None else f"{trunk.latency_ms:.1f} ms"

    @admin.display(description="layers")
    def layers(self, trunk: TrunkServer) -> str:
        return trunk.layer_range or "-"

    @admin.display(description="sessions")
    def sessions(self, trunk: TrunkServer) -> str:
        if trunk.max_sessions is None:
            return "-"
        return f"{trunk.active_sessions if trunk.active_sessions is not None else '?'}/{trunk.max_sessions}"

    @admin.display(description="device")
    def device_and_dtype(self, trunk: TrunkServer) -> str:
        return trunk.device_summary or NOT_REPORTED

    @admin.display(description="memory")
    def memory(self, trunk: TrunkServer) -> str:
        return trunk.memory_summary or NOT_REPORTED

    @admin.display(description="last check", ordering="last_checked_at")
    def last_check(self, trunk: TrunkServer) -> str:
        """In the site's format (templates/_time.html; static/js/times.js shows it in the reader's time zone)."""
        return render_to_string("_time.html", {"value": trunk.last_checked_at})

    @admin.display(description="last error")
    def short_error(self, trunk: TrunkServer) -> str:
        if not trunk.last_error:
            return ""
        return format_html('<span title="{}">{}</span>', trunk.last_error, Truncator(trunk.last_error).chars(40))

    # ------------------------------------------------------------ saving

    def save_model(self, request, trunk: TrunkServer, form, change: bool) -> None:
        connection_changed = not change or any(field in form.changed_data for field in CONNECTION_FIELDS)
        if change and connection_changed:
            # The last check was against the old settings: do not let jobs pick this trunk on its word.
            trunk.status = TrunkServer.Status.UNKNOWN
            trunk.latency_ms = None
        super().save_model(request, trunk, form, change)
        if connection_changed:
            trunk = check_trunk(trunk)
            up = trunk.status == TrunkServer.Status.UP
            self.message_user(request, f"Checked on save. {describe_check(trunk)}",
                              messages.SUCCESS if up else messages.WARNING)
        fleet.publish()

    # ------------------------------------------------------------ actions

    @admin.action(description="Check now")
    def check_now(self, request, queryset) -> None:
        for trunk in check_trunks(queryset):
            up = trunk.status == TrunkServer.Status.UP
            self.message_user(request, describe_check(trunk), messages.SUCCESS if up else messages.WARNING)
        fleet.publish()

    @admin.action(description="Enable selected trunk servers")
    def enable(self, request, queryset) -> None:
        count = queryset.update(enabled=True)
        self.message_user(request, f"{fleet.counted(count, 'trunk server')} enabled.", messages.SUCCESS)
        fleet.publish()

    @admin.action(description="Disable selected trunk servers (no new jobs; health checks stop)")
    def disable(self, request, queryset) -> None:
        count = queryset.update(enabled=False)
        self.message_user(request, f"{fleet.counted(count, 'trunk server')} disabled.", messages.SUCCESS)
        fleet.publish()
