"""Alerts on the nightly run: Prefect automations that notify when it fails, and when it is not done in time.

``crm-analytics alerts --webhook URL`` (or ``--block`` naming an existing notification block: Slack, e-mail,
Teams, PagerDuty...) creates, or replaces, two automations on the server that ``PREFECT_API_URL`` names:

- *failed*: a reactive trigger on ``prefect.flow-run.Failed`` / ``Crashed`` / ``TimedOut`` of the nightly
  deployment's runs; the notification names the run (``customer-analytics-<date>``), its state and its failure
  message (the pipeline's one ``error:`` line, which never quotes a row).
- *late*: a proactive trigger: once a nightly run is picked up by a worker (``Pending``) or marked ``Late`` (no
  worker took it), Prefect expects ``Completed`` within the deadline; if it does not come, it notifies. It fires
  also after a failure, when the date's data is still missing at the deadline.

prefect.yaml cannot hold these: its ``triggers`` only start deployments, and a notification needs the id of a
block stored on the server, so a command creates them. Prefect's event services (triggers, actions) run in
``prefect server start``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from crm_analytics.errors import PermanentError

FAILED = "crm-analytics: nightly failed"
LATE = "crm-analytics: nightly late"
WEBHOOK_BLOCK = "crm-analytics-alerts"
NIGHTLY = "customer-analytics/nightly"
FAILED_EVENTS = ["prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"]

FAILED_SUBJECT = "{{ flow_run.name }} failed"
FAILED_BODY = ("Nightly run {{ flow_run.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
               "{{ flow_run|ui_url }}")
LATE_SUBJECT = "{{ flow_run.name }} not completed in time"
LATE_BODY = ("Nightly run {{ flow_run.name }} has not completed within {{ automation.trigger.within }} of starting "
             "(state now {{ flow_run.state.name }}: {{ flow_run.state.message }})\n{{ flow_run|ui_url }}")


class AlertSetupError(PermanentError):
    """The alerts cannot be created: no server, no nightly deployment, or an unknown notification block."""


def alert_automations(deployment_id: str, block_id: str, deadline: timedelta) -> list[dict[str, Any]]:
    """The two automations, as the JSON Prefect's API takes (``AutomationCore``)."""
    runs_of_nightly = {"match": {"prefect.resource.id": "prefect.flow-run.*"},
                       "match_related": {"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
                       "for_each": ["prefect.resource.id"]}
    return [
        {"name": FAILED, "description": "The nightly customer-analytics run failed or crashed.",
         "trigger": {"type": "event", **runs_of_nightly, "posture": "Reactive", "expect": FAILED_EVENTS,
                     "threshold": 1, "within": 0},
         "actions": [{"type": "send-notification", "block_document_id": block_id, "subject": FAILED_SUBJECT,
                      "body": FAILED_BODY}]},
        {"name": LATE, "description": f"The nightly customer-analytics run did not complete within {deadline} of "
                                      "being picked up by a worker (or of being marked late).",
         "trigger": {"type": "event", **runs_of_nightly, "posture": "Proactive",
                     "after": ["prefect.flow-run.Pending", "prefect.flow-run.Late"],
                     "expect": ["prefect.flow-run.Completed"], "threshold": 1,
                     "within": deadline.total_seconds()},
         "actions": [{"type": "send-notification", "block_document_id": block_id, "subject": LATE_SUBJECT,
                      "body": LATE_BODY}]},
    ]


def _notification_block(webhook: str | None, block: str | None) -> str:
    """The id of the notification block: a Custom Webhook block for ``webhook`` (saved, overwriting), or the
    existing block ``block`` (``<block-type-slug>/<name>``, e.g. ``slack-webhook/ops``)."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, NotificationBlock

    if webhook:
        notifier = CustomWebhookNotificationBlock(name=WEBHOOK_BLOCK, url=webhook, method="POST",
                                                  json_data={"subject": "{{subject}}", "body": "{{body}}"})
        return str(notifier.save(WEBHOOK_BLOCK, overwrite=True))
    try:
        loaded = Block.load(block)
    except (ValueError, RuntimeError) as exc:
        raise AlertSetupError(f"notification block {block!r} not found: {exc}") from None
    if not isinstance(loaded, NotificationBlock):
        raise AlertSetupError(f"block {block!r} is a {type(loaded).__name__}, not a notification block")
    return str(loaded._block_document_id)


def create_alerts(webhook: str | None = None, block: str | None = None, deadline: timedelta = timedelta(hours=4),
                  deployment: str = NIGHTLY) -> list[str]:
    """Create (or replace, by name) the failed and late automations for ``deployment``; return their ids."""
    if bool(webhook) == bool(block):
        raise AlertSetupError("give either a webhook URL or a notification block, not both or neither")
    if deadline < timedelta(seconds=10):
        raise AlertSetupError(f"the deadline {deadline} is shorter than Prefect's minimum of 10 seconds")
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            nightly = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise AlertSetupError(f"deployment {deployment!r} is not on the server: run `prefect deploy --all` "
                                  "first") from None
        block_id = _notification_block(webhook, block)
        ids = []
        for spec in alert_automations(str(nightly.id), block_id, deadline):
            for existing in client.read_automations_by_name(spec["name"]):
                client.delete_automation(existing.id)
            ids.append(str(client.create_automation(AutomationCore.model_validate(spec))))
    return ids
