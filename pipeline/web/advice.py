"""What a person can do about a held batch or a group of failed jobs (pure: codes in, text out).

The dashboard shows these next to the reason; the buttons it names call
`pipeline.batch.controls`.
"""

from __future__ import annotations

from pipeline.states import BatchState, HoldCode, JobState

# error code -> what to do (codes from the API, the gateway and preflight's invalid_<field>)
FAILURE_ADVICE = {
    "moderation_blocked": "The safety system refused the request: change the prompt or the "
    "image, then Retry failed with a new prompt.",
    "image_generation_user_error": "The API refused this image or prompt: change it, then "
    "Retry failed with a new prompt.",
    "invalid_request_error": "The API refused a parameter: see the message, fix the row in the "
    "manifest and submit it again.",
    "invalid_value": "The API refused a value (often the model or size): fix the row, or Retry "
    "failed with another model from the CLI (`editbatch retry BATCH --failed --model M`).",
    "model_not_found": "The model is not available (shut down or not enabled for this "
    "organisation): Retry failed with another model (`editbatch retry BATCH --failed --model "
    "M`).",
    "unsupported_file_mimetype": "The API did not accept the file type: convert the image "
    "(submit with --convert) and submit the row again.",
    "timeout": "Every attempt timed out: Retry failed; if it keeps happening, raise "
    "EDITBATCH_REQUEST_TIMEOUT_SECONDS.",
    "connection_error": "The API could not be reached: check the network, then Retry failed.",
    "server_error": "The API kept failing on its side: Retry failed later.",
    "rate_limit_exceeded": "Rate limited on every attempt: lower EDITBATCH_IMAGES_PER_MINUTE "
    "to your tier's limit, then Retry failed.",
    "unreadable_response": "The API's answers could not be read: Retry failed.",
    "bad_image_data": "The API sent images that do not decode: Retry failed.",
    "contentFilter": "Azure's content filter refused the request (the message says what was "
    "filtered): change the prompt or the image, then Retry failed with a new prompt.",
    "content_filter": "The provider's content filter refused the request: change the prompt or "
    "the image, then Retry failed with a new prompt.",
    "content_policy_violation": "The provider's content policy refused the request: change the "
    "prompt or the image, then Retry failed with a new prompt.",
}
REJECTED_ADVICE = (
    "Preflight refused the row before any spending: fix it in the manifest (the message names "
    "the field) and submit the corrected rows as a new batch."
)
DEFAULT_ADVICE = "Read the message; Retry failed runs these jobs again (successes are kept)."


def failure_advice(code: str | None, state: str) -> str:
    """What to do about jobs that ended `state` with error `code`."""
    if state == JobState.REJECTED:
        return REJECTED_ADVICE
    return FAILURE_ADVICE.get(code or "", DEFAULT_ADVICE)


def hold_advice(code: str | None, reason: str | None, state: str) -> str | None:
    """The fix for a held or paused batch (`hold_code`), naming the dashboard's button; None
    for a batch that is neither."""
    if state == BatchState.PAUSED:
        return "Paused by a person: Resume to continue."
    if state != BatchState.HELD:
        return None
    if code == HoldCode.BUDGET:
        return "The budget is reached: Resume with a higher budget (USD) to continue."
    if code == HoldCode.DAILY_BUDGET:
        return (
            "Today's spending cap (EDITBATCH_DAILY_BUDGET_USD) is reached: raise it, or Resume "
            "after midnight UTC."
        )
    if code == HoldCode.QUOTA:
        return (
            "The OpenAI account is out of credit or past its spend limit: add credit or raise "
            "the limit on the OpenAI billing page, then Resume."
        )
    if code == HoldCode.AUTH and (reason or "").startswith("403"):
        return (
            "The organisation may not use this model (for example, it must be verified): fix "
            "that on the OpenAI platform, then Resume."
        )
    if code == HoldCode.AUTH:
        return "The API key was refused: set a valid OPENAI_API_KEY for the workers, then Resume."
    if code == HoldCode.MODEL_UNAVAILABLE:
        return (
            "The API no longer serves this model: move the batch to another one from the "
            "command line (`editbatch resume BATCH --model-map OLD=NEW`, as the reason says); "
            "Resume alone would be held again."
        )
    if code == HoldCode.PROVIDER:
        return (
            "A provider setting is wrong (an Azure deployment or api-version the resource does "
            "not know, or a provider the workers lack): fix it as the reason says "
            "(docs/providers.md), restart the workers, then Resume."
        )
    if code == HoldCode.PROVIDER_REFUSED:
        return (
            "The Batch API refused a whole provider batch (the reason gives its error): fix "
            "that, or send the rest on the synchronous route, then Resume."
        )
    if code == HoldCode.INPUT_UNREADABLE:
        return (
            "An input file went missing after preflight: put it back where the manifest says "
            "(or cancel and resubmit without it), then Resume."
        )
    if code == HoldCode.API_UNREACHABLE:
        return (
            "The API stopped answering (no connection, timeouts or 5xx): editbatch is probing "
            "it and resumes the batch by itself when it answers; nothing to do unless the "
            "outage is on your side (network, proxy, OPENAI_BASE_URL)."
        )
    if code == HoldCode.OUTAGE:
        return (
            "The API did not answer for EDITBATCH_BREAKER_GIVE_UP_SECONDS, so probing stopped: "
            "check the provider's status page and your network, then Resume once it is back."
        )
    return "Fix the cause named in the reason, then Resume."
