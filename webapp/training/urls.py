from django.urls import path

from . import views

app_name = "training"
urlpatterns = [
    path("", views.job_list, name="job-list"),
    path("new/", views.job_new, name="job-new"),
    path("compare/", views.job_compare, name="job-compare"),
    path("<int:pk>/", views.job_detail, name="job-detail"),
    path("<int:pk>/cancel/", views.job_cancel, name="job-cancel"),
    path("<int:pk>/resume/", views.job_resume, name="job-resume"),
    path("<int:pk>/delete/", views.job_delete, name="job-delete"),
    path("<int:pk>/adapter/", views.job_adapter, name="job-adapter"),
    path("<int:pk>/merged/", views.job_merged, name="job-merged"),
]
