{{/*
Alert rules of one experiment, as the `groups` list that PrometheusRule (Prometheus
Operator), Rules (Google Managed Prometheus) and a plain Prometheus rule file share.
Every selector is limited to this release's namespace and experiment, so several
experiments in one cluster alert separately. Thresholds come from monitoring.alerts.
The metric names are those of app/distill/metrics.py.
*/}}
{{- define "distill.alertGroups" -}}
{{- $alerts := .Values.monitoring.alerts }}
{{- $experiment := include "distill.experiment" . }}
{{- $selector := printf "namespace=%q, experiment=%q" .Release.Namespace $experiment }}
{{- $by := "namespace, experiment" }}
{{- $lookback := $alerts.workerMissingLookback }}
- name: distill-{{ $experiment }}
  interval: {{ $alerts.evaluationInterval }}
  rules:
    - alert: DistillTrainingStalled
      # The heartbeat is set when the exporter starts and after every step, so this also
      # catches a start-up that hangs (model loading plus the first compile must fit).
      expr: |-
        time() - max by ({{ $by }}) (distill_heartbeat_timestamp_seconds{ {{- $selector -}} }) > {{ $alerts.stalledAfterSeconds }}
      labels:
        severity: critical
      annotations:
        summary: {{`Distillation {{ $labels.experiment }} has completed no step for {{ $value | humanizeDuration }}`}}
        description: {{`No worker of experiment {{ $labels.experiment }} in namespace {{ $labels.namespace }} finished an optimizer step recently. Check the worker logs (kubectl logs) for a hang in data loading, a collective or a checkpoint write.`}}
    - alert: DistillLossNotFinite
      # NaN is the only value that differs from itself.
      expr: |-
        count by ({{ $by }}) ((distill_loss{ {{- $selector -}} } != distill_loss{ {{- $selector -}} }) or (abs(distill_loss{ {{- $selector -}} }) == +Inf)) > 0
      labels:
        severity: critical
      annotations:
        summary: {{`Distillation {{ $labels.experiment }} has a NaN or infinite loss`}}
        description: {{`The training loss of experiment {{ $labels.experiment }} is not a finite number; the run is diverging. Stop it and resume from the last checkpoint with a lower learning rate.`}}
    - alert: DistillThroughputLow
      expr: |-
        sum by ({{ $by }}) (rate(distill_tokens_total{ {{- $selector -}} }[{{ $alerts.throughputWindow }}]))
          < {{ $alerts.throughputDropFraction }} * sum by ({{ $by }}) (rate(distill_tokens_total{ {{- $selector -}} }[{{ $alerts.throughputBaselineWindow }}]))
      for: {{ $alerts.throughputFor }}
      labels:
        severity: warning
      annotations:
        summary: {{ printf "Distillation {{ $labels.experiment }} runs below %v of its own tokens/s over the last %s" $alerts.throughputDropFraction $alerts.throughputBaselineWindow | quote }}
        description: {{`Tokens per second of experiment {{ $labels.experiment }} dropped to {{ $value | humanize }}; look at step time, data wait and missing workers on the dashboard.`}}
    - alert: DistillCheckpointOverdue
      # Before the first checkpoint of a process, its start time stands in.
      expr: |-
        time() - (
          max by ({{ $by }}) (distill_checkpoint_last_success_timestamp_seconds{ {{- $selector -}} })
          or max by ({{ $by }}) (distill_start_time_seconds{ {{- $selector -}} })
        ) > {{ $alerts.checkpointOverdueAfterSeconds }}
      labels:
        severity: warning
      annotations:
        summary: {{`Distillation {{ $labels.experiment }} committed no checkpoint for {{ $value | humanizeDuration }}`}}
        description: {{`A preemption of experiment {{ $labels.experiment }} now loses more work than planned. Check the logs for checkpoint errors and the save directory's permissions and quota.`}}
    - alert: DistillCheckpointFailed
      expr: |-
        sum by ({{ $by }}) (increase(distill_checkpoint_failures_total{ {{- $selector -}} }[{{ $alerts.checkpointFailureWindow }}])) > 0
      labels:
        severity: warning
      annotations:
        summary: {{ printf "Distillation {{ $labels.experiment }} failed to write a checkpoint in the last %s" $alerts.checkpointFailureWindow | quote }}
        description: {{`The worker logs of experiment {{ $labels.experiment }} name the failed step and the error.`}}
    - alert: DistillWorkerMissing
      # Workers seen (deduplicated by slice and worker, in case two monitors scrape them)
      # against the expected count over the lookback; a run that reached its last step is
      # finished, not missing.
      expr: |-
        (
          max by ({{ $by }}) (max_over_time(distill_expected_workers{ {{- $selector -}} }[{{ $lookback }}]))
          - (
            count by ({{ $by }}) (count by ({{ $by }}, slice, worker) (distill_heartbeat_timestamp_seconds{ {{- $selector -}} }))
            or 0 * max by ({{ $by }}) (max_over_time(distill_expected_workers{ {{- $selector -}} }[{{ $lookback }}]))
          )
        ) > 0
        unless on ({{ $by }}) (
          max by ({{ $by }}) (max_over_time(distill_last_completed_step{ {{- $selector -}} }[{{ $lookback }}]))
          >= max by ({{ $by }}) (max_over_time(distill_total_steps{ {{- $selector -}} }[{{ $lookback }}]))
        )
      for: {{ $alerts.workerMissingFor }}
      labels:
        severity: critical
      annotations:
        summary: {{`Distillation {{ $labels.experiment }} is missing {{ $value }} worker(s)`}}
        description: {{`Fewer workers of experiment {{ $labels.experiment }} are scraped than the run layout expects. Check pod status (kubectl get pods) and the JobSet's restarts.`}}
{{- end }}
