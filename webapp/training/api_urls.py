from django.urls import path

from . import api

urlpatterns = [
    path("jobs/", api.JobList.as_view(), name="api-job-list"),
    path("jobs/<int:pk>/", api.JobDetail.as_view(), name="api-job-detail"),
    path("jobs/<int:pk>/metrics/", api.job_metrics, name="api-job-metrics"),
    path("jobs/<int:pk>/cancel/", api.job_cancel, name="api-job-cancel"),
    path("jobs/<int:pk>/resume/", api.job_resume, name="api-job-resume"),
    path("jobs/<int:pk>/adapter/", api.job_adapter, name="api-job-adapter"),
    path("jobs/<int:pk>/merged/", api.job_merged, name="api-job-merged"),
]
