from django.urls import path

from . import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("new/<str:kind>/", views.create, name="create"),
    path("instances/<int:pk>/", views.detail, name="instance"),
    path("instances/<int:pk>/panel/", views.panel, name="instance-panel"),
    path("instances/<int:pk>/delete/", views.delete, name="instance-delete"),
    path("instances/<int:pk>/snapshot/", views.snapshot_now, name="instance-snapshot"),
    path("instances/<int:pk>/restore/<int:sid>/", views.restore, name="instance-restore"),
    path("instances/<int:pk>/restore-to-time/", views.restore_to_time, name="instance-restore-time"),
    path("instances/<int:pk>/clone-at-time/", views.clone_at_time, name="instance-clone-time"),
    path("instances/<int:pk>/import/", views.import_file, name="instance-import"),
    path("instances/<int:pk>/ca.pem", views.ca_certificate, name="instance-ca"),
    path("instances/<int:pk>/settings/", views.settings_page, name="instance-settings"),
    path("instances/<int:pk>/extend/", views.extend, name="instance-extend"),
    path("instances/<int:pk>/protect/", views.protect, name="instance-protect"),
    path("instances/<int:pk>/evacuate/", views.evacuate, name="instance-evacuate"),
    path("instances/<int:pk>/<slug:action>/", views.act, name="instance-action"),
    path("snapshots/<int:sid>/clone/", views.clone, name="snapshot-clone"),
    path("snapshots/<int:sid>/delete/", views.snapshot_delete, name="snapshot-delete"),
    path("snapshots/<int:sid>/download/", views.snapshot_download, name="snapshot-download"),
    path("snapshots/<int:sid>/verify/", views.snapshot_verify, name="snapshot-verify"),
    path("token/", views.token, name="token"),
    path("token/<int:pk>/revoke/", views.revoke_token, name="token-revoke"),
    path("webhooks/", views.webhook_list, name="webhooks"),
    path("webhooks/<int:pk>/", views.webhook_detail, name="webhook"),
    path("webhooks/<int:pk>/delete/", views.webhook_delete, name="webhook-delete"),
]
