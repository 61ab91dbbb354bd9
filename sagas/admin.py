"""The operators' view of sagas: find them, read their history, act on FAILED ones.

Nothing here edits a saga or its log directly. The two operator actions call
``sagas.services``, which move the saga with a conditional UPDATE and record
the operator in the SagaLog; every form the admin would generate is read-only.

The changelist must stay fast with millions of rows: one indexed ordering
(``-created_at``), filters and searches that hit indexes, no full COUNT(*)
and no ``date_hierarchy`` aggregates.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_permission_codename
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, Q, Subquery
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.views.decorators.http import require_POST
from django_celery_results.models import TaskResult

from sagas import feed, services
from sagas.admin_support import EstimatedCountPaginator, ReadOnlyAdminMixin, humanize_ms
from sagas.definitions import registry
from sagas.errors import SagaError
from sagas.models import Saga, SagaLog

# An operator action is a manual, per-saga decision; a bigger batch belongs in
# a management command, not in one web request.
MAX_OPERATOR_BATCH = 200

SAGA_COLOURS = {
    Saga.Status.PENDING: "#6b7280",
    Saga.Status.RUNNING: "#2563eb",
    Saga.Status.COMPENSATING: "#b45309",
    Saga.Status.COMPLETED: "#15803d",
    Saga.Status.COMPENSATED: "#7c3aed",
    Saga.Status.FAILED: "#b91c1c",
}
LOG_COLOURS = {
    SagaLog.Status.SUCCEEDED: "#15803d",
    SagaLog.Status.SKIPPED: "#0f766e",
    SagaLog.Status.RETRYING: "#b45309",
    SagaLog.Status.FAILED: "#b91c1c",
    SagaLog.Status.TIMED_OUT: "#c2410c",
    SagaLog.Status.DUPLICATE: "#6b7280",
    SagaLog.Status.IGNORED: "#6b7280",
    SagaLog.Status.NOTE: "#1d4ed8",
}
BADGE = (
    '<span class="saga-badge" style="display:inline-block;padding:2px 8px;border-radius:9px;'
    'background:{};color:#fff;font-weight:600;font-size:11px;white-space:nowrap">{}</span>'
)


def status_badge(saga: Saga):
    label = saga.get_status_display()
    if saga.status == Saga.Status.FAILED and saga.is_resolved:
        label = f"{label} \u00b7 resolved"
    return format_html(BADGE, SAGA_COLOURS.get(saga.status, "#6b7280"), label)


def parse_uuid(term: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(term)
    except ValueError:
        return None


# --- filters ------------------------------------------------------------------


class SagaTypeFilter(admin.SimpleListFilter):
    """Choices from the registry, not SELECT DISTINCT over the whole table."""

    title = "type"
    parameter_name = "saga_type"

    def lookups(self, request, model_admin):
        return [(name, name) for name in registry.names()]

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(saga_type=self.value())
        return queryset


class CreatedFilter(admin.SimpleListFilter):
    title = "created"
    parameter_name = "created"
    DAYS = {"7d": 7, "30d": 30}

    def lookups(self, request, model_admin):
        return [("today", "Today"), ("7d", "Past 7 days"), ("30d", "Past 30 days")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "today":
            midnight = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
            return queryset.filter(created_at__gte=midnight)
        if self.value() in self.DAYS:
            return queryset.filter(created_at__gte=now - timedelta(days=self.DAYS[self.value()]))
        return queryset


# --- operator actions -----------------------------------------------------------


class ResolveForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5, "cols": 80}),
        max_length=2000,
        help_text="How was the saga settled by hand? Kept on the saga and in its log.",
        error_messages={"required": "A reason is required to mark a saga resolved."},
    )


def _short(saga_id) -> str:
    return str(saga_id)[:8]


def _precise(moment):
    """Log times to the millisecond: retries and compensations are apart by less."""
    local = timezone.localtime(moment)
    text = f"{local:%m-%d %H:%M:%S}.{local.microsecond // 1000:03d}"
    return format_html(
        '<span style="white-space:nowrap" title="{}">{}</span>', local.isoformat(), text
    )


def _when(moment):
    text = timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S")
    return format_html('<span style="white-space:nowrap">{}</span>', text)


def _retry_one(model_admin: SagaAdmin, request, saga_id) -> Saga | None:
    try:
        saga = services.saga_retry_compensation(
            saga_id=saga_id, operator=request.user.get_username()
        )
    except SagaError as exc:
        model_admin.message_user(request, f"Saga {saga_id}: {exc}", messages.ERROR)
        return None
    model_admin.log_change(request, saga, "Retried compensation.")
    return saga


def _resolve_one(model_admin: SagaAdmin, request, saga_id, reason: str) -> Saga | None:
    try:
        saga = services.saga_mark_resolved(
            saga_id=saga_id, operator=request.user.get_username(), reason=reason
        )
    except SagaError as exc:
        model_admin.message_user(request, f"Saga {saga_id}: {exc}", messages.ERROR)
        return None
    model_admin.log_change(request, saga, f"Marked resolved: {reason}")
    return saga


def _take_batch(model_admin: SagaAdmin, request, queryset) -> list[Saga] | None:
    sagas = list(
        queryset.only("id", "status", "saga_type", "resolved_at", "resolved_by")[
            : MAX_OPERATOR_BATCH + 1
        ]
    )
    if len(sagas) > MAX_OPERATOR_BATCH:
        model_admin.message_user(
            request,
            f"Select at most {MAX_OPERATOR_BATCH} sagas at a time; nothing was changed.",
            messages.ERROR,
        )
        return None
    return sagas


def _warn_not_failed(model_admin: SagaAdmin, request, sagas: list[Saga], verb: str) -> None:
    others = [saga for saga in sagas if saga.status != Saga.Status.FAILED]
    if others:
        listed = ", ".join(f"{_short(saga.pk)} ({saga.status})" for saga in others)
        model_admin.message_user(
            request,
            f"Only FAILED sagas can {verb}; {len(others)} selected saga(s) left untouched: "
            f"{listed}.",
            messages.WARNING,
        )


@admin.action(description="Retry compensation of selected FAILED sagas", permissions=["operate"])
def retry_compensation(model_admin: SagaAdmin, request, queryset):
    sagas = _take_batch(model_admin, request, queryset)
    if sagas is None:
        return
    retried = [
        saga
        for saga in sagas
        if saga.status == Saga.Status.FAILED and _retry_one(model_admin, request, saga.pk)
    ]
    if retried:
        model_admin.message_user(
            request,
            f"Compensation retried for {len(retried)} saga(s): "
            f"{', '.join(_short(saga.pk) for saga in retried)}.",
            messages.SUCCESS,
        )
    _warn_not_failed(model_admin, request, sagas, "retry compensation")


@admin.action(description="Mark selected FAILED sagas resolved\u2026", permissions=["operate"])
def mark_resolved(model_admin: SagaAdmin, request, queryset):
    """Asks for a reason on an intermediate page, then records it on each FAILED saga."""
    sagas = _take_batch(model_admin, request, queryset)
    if sagas is None:
        return None
    form = ResolveForm(request.POST if "apply" in request.POST else None)
    if form.is_valid():
        reason = form.cleaned_data["reason"]
        resolved = [
            saga
            for saga in sagas
            if saga.status == Saga.Status.FAILED
            and _resolve_one(model_admin, request, saga.pk, reason)
        ]
        if resolved:
            model_admin.message_user(
                request,
                f"Marked {len(resolved)} saga(s) resolved: "
                f"{', '.join(_short(saga.pk) for saga in resolved)}.",
                messages.SUCCESS,
            )
        _warn_not_failed(model_admin, request, sagas, "be marked resolved")
        return None
    return model_admin.resolve_form_response(request, sagas, form, from_changelist=True)


# --- SagaLog ------------------------------------------------------------------


def log_status_badge(row: SagaLog):
    return format_html(BADGE, LOG_COLOURS.get(row.status, "#6b7280"), row.get_status_display())


def task_result_url(task_result_pk) -> str:
    if task_result_pk is None:
        return ""
    try:
        return reverse("admin:django_celery_results_taskresult_change", args=[task_result_pk])
    except NoReverseMatch:
        return ""


def with_task_results(queryset):
    """Annotate each log row with its TaskResult's pk, in the same single query."""
    return queryset.annotate(
        task_result_pk=Subquery(
            TaskResult.objects.filter(task_id=OuterRef("task_id")).values("pk")[:1]
        )
    )


class ReadOnlyLogMixin(ReadOnlyAdminMixin):
    """The log is append-only history: no add, change or delete, ever."""

    @admin.display(description="status")
    def status_badge(self, obj: SagaLog):
        return log_status_badge(obj)

    @admin.display(description="task id")
    def task_link(self, obj: SagaLog):
        if not obj.task_id:
            return "\u2014"
        # Imported here: this method is the only part of the module that needs them.
        from urllib.parse import quote

        from django.conf import settings

        # Celery task ids are long; the first characters tell rows apart and
        # the whole id is in the tooltip and on the log row's own page.
        short = obj.task_id if len(obj.task_id) <= 13 else f"{obj.task_id[:12]}\u2026"
        url = task_result_url(getattr(obj, "task_result_pk", None))
        if not url:
            label = format_html('<span title="{}">{}</span>', obj.task_id, short)
        else:
            label = format_html(
                '<a href="{}" title="Celery task result {}">{}</a>', url, obj.task_id, short
            )
        if not settings.FLOWER_URL:
            return label
        # Flower (FLOWER_URL) shows the task's arguments, worker, timing and traceback.
        flower = f"{settings.FLOWER_URL}/task/{quote(obj.task_id, safe='')}"
        return format_html(
            '{} <a href="{}" title="Task {} in Flower" target="_blank" rel="noopener">Flower</a>',
            label,
            flower,
            obj.task_id,
        )

    @admin.display(description="duration")
    def duration(self, obj: SagaLog):
        return humanize_ms(obj.duration_ms)

    @admin.display(description="started")
    def started(self, obj: SagaLog):
        return _precise(obj.started_at)

    @admin.display(description="finished")
    def finished(self, obj: SagaLog):
        return _precise(obj.finished_at)

    @admin.display(description="error")
    def error_text(self, obj: SagaLog):
        if not obj.error:
            return ""
        return format_html('<span style="white-space:pre-wrap">{}</span>', obj.error)


class SagaLogInline(ReadOnlyLogMixin, admin.TabularInline):
    model = SagaLog
    extra = 0
    can_delete = False
    show_change_link = False
    ordering = ["id"]
    fields = [
        "step",
        "phase",
        "status_badge",
        "attempt",
        "task_link",
        "worker",
        "started",
        "finished",
        "duration",
        "error_text",
    ]
    readonly_fields = fields
    verbose_name = "log entry"
    verbose_name_plural = "log (oldest first)"

    def get_queryset(self, request):
        return with_task_results(super().get_queryset(request))

    def has_view_permission(self, request, obj=None):
        # Whoever may read the saga may read its history.
        opts = self.parent_model._meta
        return any(
            request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
            for action in ("view", "change")
        )


@admin.register(SagaLog)
class SagaLogAdmin(ReadOnlyLogMixin, admin.ModelAdmin):
    list_display = [
        "started",
        "saga_link",
        "step",
        "phase",
        "status_badge",
        "attempt",
        "task_link",
        "worker",
        "duration",
    ]
    list_filter = ["phase", "status"]
    search_fields = ["=task_id"]
    search_help_text = "A saga id, or a Celery task id (exact)."
    ordering = ["-id"]
    sortable_by = []
    show_facets = admin.ShowFacets.NEVER
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    fields = [
        "saga_link",
        "step",
        "step_index",
        "phase",
        "status_badge",
        "attempt",
        "task_link",
        "worker",
        "started",
        "finished",
        "duration",
        "error_text",
        "result_pretty",
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        return with_task_results(super().get_queryset(request))

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        saga_id = parse_uuid(term)
        if saga_id is not None:
            return queryset.filter(Q(saga_id=saga_id) | Q(task_id=term)), False
        return queryset.filter(task_id=term), False

    @admin.display(description="saga")
    def saga_link(self, obj: SagaLog):
        url = reverse("admin:sagas_saga_change", args=[obj.saga_id])
        return format_html('<a href="{}">{}</a>', url, _short(obj.saga_id))

    @admin.display(description="result")
    def result_pretty(self, obj: SagaLog):
        return format_html("<pre>{}</pre>", json.dumps(obj.result, indent=2, sort_keys=True))


# --- Saga ---------------------------------------------------------------------


UNKNOWN_TYPES_CACHE_KEY = "sagas:admin:unknown-types"


@admin.register(Saga)
class SagaAdmin(admin.ModelAdmin):
    list_display = [
        "short_id",
        "status_badge",
        "saga_type",
        "business_key",
        "created",
        "started",
        "duration",
        "now_running",
    ]
    list_filter = ["status", SagaTypeFilter, CreatedFilter]
    # Only the indexed column may be sorted on; see Saga.Meta.indexes.
    sortable_by = ["created"]
    ordering = ["-created_at"]
    # Facet counts are aggregates over the whole table.
    show_facets = admin.ShowFacets.NEVER
    # search_fields only makes the box appear; get_search_results does the work.
    search_fields = ["=business_key"]
    search_help_text = "A saga id, a booking id, or an exact business key (booking:<uuid>)."
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 50
    actions = [retry_compensation, mark_resolved]
    inlines = [SagaLogInline]

    def changelist_view(self, request, extra_context=None):
        # A scan of the sagas in flight (~20 ms at a million rows): once a minute per process.
        unknown = cache.get_or_set(UNKNOWN_TYPES_CACHE_KEY, services.sagas_of_unknown_type, 60)
        if unknown:
            listed = ", ".join(f"{name} ({n})" for name, n in sorted(unknown.items()))
            self.message_user(
                request,
                f"Sagas of a type this deployment does not declare are waiting, and recovery "
                f"skips them: {listed}. Deploy the code that declares them, or end them.",
                messages.WARNING,
            )
        return super().changelist_view(request, extra_context)

    fieldsets = [
        (
            None,
            {
                "fields": [
                    "id",
                    "saga_type",
                    "status_badge",
                    "business_key",
                    ("now_running", "last_moved"),
                    ("steps_done", "undo_cursor"),
                    "trace_link",
                ]
            },
        ),
        (
            "Timing",
            {
                "fields": [
                    ("created_at", "dispatched_at"),
                    ("started_at", "finished_at"),
                    ("duration", "deadline"),
                    "compensation_deadline",
                    "updated_at",
                ]
            },
        ),
        ("Failure", {"fields": ["failure_reason_text"]}),
        ("Resolution", {"fields": ["resolved_at", "resolved_by", "resolution"]}),
        ("Context", {"fields": ["context_pretty"]}),
    ]
    readonly_fields = [
        "id",
        "saga_type",
        "status_badge",
        "business_key",
        "now_running",
        "last_moved",
        "steps_done",
        "undo_cursor",
        "created_at",
        "dispatched_at",
        "started_at",
        "finished_at",
        "duration",
        "deadline",
        "compensation_deadline",
        "updated_at",
        "failure_reason_text",
        "resolved_at",
        "resolved_by",
        "resolution",
        "context_pretty",
        "trace_link",
    ]

    # --- permissions ----------------------------------------------------------
    # Staff with the view (or change) permission read everything; no form ever
    # saves a saga. "operate" (the change permission) unlocks the two actions,
    # which go through sagas.services.

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # Deleting a saga would cascade to its log, the audit trail.
        return False

    def has_operate_permission(self, request, obj=None):
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename('change', opts)}")

    # --- changelist -----------------------------------------------------------

    def get_search_results(self, request, queryset, search_term):
        """Exact, indexed matches only: never a LIKE scan over millions of rows."""
        term = search_term.strip()
        if not term:
            return queryset, False
        saga_id = parse_uuid(term)
        if saga_id is not None:
            return queryset.filter(Q(id=saga_id) | Q(business_key=f"booking:{saga_id}")), False
        return queryset.filter(business_key=term), False

    @admin.display(description="saga")
    def short_id(self, obj: Saga):
        return _short(obj.pk)

    @admin.display(description="status")
    def status_badge(self, obj: Saga):
        return status_badge(obj)

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: Saga):
        return _when(obj.created_at)

    @admin.display(description="started")
    def started(self, obj: Saga):
        return _when(obj.started_at) if obj.started_at else "not started"

    @admin.display(description="duration")
    def duration(self, obj: Saga):
        if obj.duration_ms is not None:
            return humanize_ms(obj.duration_ms)
        if obj.started_at is not None and not obj.is_terminal:
            running = humanize_ms(int((timezone.now() - obj.started_at).total_seconds() * 1000))
            return format_html('<span title="still running">{} so far</span>', running)
        return humanize_ms(None)

    @admin.display(description="running now")
    def now_running(self, obj: Saga):
        return feed.step_running(obj) or "\u2014"

    @admin.display(description="last step done")
    def last_moved(self, obj: Saga):
        return obj.current_step or "\u2014"

    # --- change page ------------------------------------------------------------

    @admin.display(description="failure reason")
    def failure_reason_text(self, obj: Saga):
        if not obj.failure_reason:
            return "\u2014"
        return format_html(
            '<span style="white-space:pre-wrap;color:#b91c1c;font-weight:600">{}</span>',
            obj.failure_reason,
        )

    @admin.display(description="context")
    def context_pretty(self, obj: Saga):
        text = json.dumps(obj.context, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html('<pre style="margin:0;white-space:pre-wrap">{}</pre>', text)

    @admin.display(description="trace")
    def trace_link(self, obj: Saga):
        """The saga's trace id, linked through SAGA_TRACE_URL_TEMPLATE (e.g. Jaeger) when set."""
        from django.conf import settings

        from sagas.tracing import trace_id_of

        trace_id = trace_id_of(obj.trace_context)
        if not trace_id:
            return "\u2014"
        template = getattr(settings, "SAGA_TRACE_URL_TEMPLATE", "")
        if not template:
            return format_html("<code>{}</code>", trace_id)
        url = template.format(trace_id=trace_id)
        return format_html('<a href="{}" rel="noopener"><code>{}</code></a>', url, trace_id)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(self.saga_page_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def saga_page_context(self, request, saga: Saga) -> dict:
        can_act = (
            saga.status == Saga.Status.FAILED
            and not saga.is_resolved
            and self.has_operate_permission(request)
        )
        return {**feed.graph_page_context(saga), "saga": saga, "can_act": can_act}

    # --- the live operations page ---------------------------------------------------

    def live_view(self, request):
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Sagas live",
            "opts": self.opts,
            "feed_url": reverse("saga-live"),
            "change_url_template": reverse(
                f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
                args=["00000000-0000-0000-0000-000000000000"],
            ),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sagas/saga/live.html", context)

    # --- object actions (buttons on the change page) ------------------------------

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        view = self.admin_site.admin_view
        return [
            path("live/", view(self.live_view), name="{}_{}_live".format(*info)),
            path(
                "<path:object_id>/retry-compensation/",
                view(require_POST(self.retry_compensation_view)),
                name="{}_{}_retry_compensation".format(*info),
            ),
            path(
                "<path:object_id>/mark-resolved/",
                view(self.mark_resolved_view),
                name="{}_{}_mark_resolved".format(*info),
            ),
            *super().get_urls(),
        ]

    def _operated_saga(self, request, object_id) -> Saga:
        if not self.has_operate_permission(request):
            raise PermissionDenied
        saga = self.get_object(request, unquote(object_id))
        if saga is None:
            raise Http404(f"saga {object_id} does not exist")
        return saga

    def _change_url(self, saga: Saga) -> str:
        return reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[saga.pk])

    def retry_compensation_view(self, request, object_id):
        saga = self._operated_saga(request, object_id)
        if _retry_one(self, request, saga.pk):
            self.message_user(request, "Compensation retried.", messages.SUCCESS)
        return HttpResponseRedirect(self._change_url(saga))

    def mark_resolved_view(self, request, object_id):
        saga = self._operated_saga(request, object_id)
        form = ResolveForm(request.POST if request.method == "POST" else None)
        if form.is_valid():
            if _resolve_one(self, request, saga.pk, form.cleaned_data["reason"]):
                self.message_user(request, "Saga marked resolved.", messages.SUCCESS)
            return HttpResponseRedirect(self._change_url(saga))
        return self.resolve_form_response(request, [saga], form, from_changelist=False)

    def resolve_form_response(self, request, sagas, form, *, from_changelist: bool):
        opts = self.opts
        context = {
            **self.admin_site.each_context(request),
            "title": "Mark sagas resolved",
            "opts": opts,
            "form": form,
            "failed": [s for s in sagas if s.status == Saga.Status.FAILED],
            "others": [s for s in sagas if s.status != Saga.Status.FAILED],
            "from_changelist": from_changelist,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "change_url": self._change_url(sagas[0]) if sagas and not from_changelist else "",
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sagas/saga/mark_resolved.html", context)
