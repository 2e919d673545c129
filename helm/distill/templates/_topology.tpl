{{/*
Process layout of the experiment, derived from files/tpu-topologies.yaml (the same
table distill.topology reads) or from cpu.hosts. Returned as JSON; use it with
  {{- $layout := include "distill.layout" . | fromJson }}
Keys: accelerator, tpuType, acceleratorLabel, topology, chipsPerHost, hostsPerSlice,
slices, devices, machineType (set only where the table names it for one row because
the shape exists in more than one host layout).
Rendering fails here when the TPU type is unknown or the topology override does not
match the type.
*/}}
{{- define "distill.layout" -}}
{{- $layout := dict "accelerator" .Values.accelerator }}
{{- if eq .Values.accelerator "tpu" }}
{{- $table := .Files.Get "files/tpu-topologies.yaml" | fromYaml }}
{{- $type := .Values.tpu.type }}
{{- $row := get $table.types $type }}
{{- if not $row }}
{{- fail (printf "tpu.type=%q is not a known TPU type; use one of: %s" $type (keys $table.types | sortAlpha | join ", ")) }}
{{- end }}
{{- $family := get $table.families $row.family }}
{{- $override := .Values.tpu.topology }}
{{- if and $override (ne $override $row.topology) }}
{{- $matches := list }}
{{- range $name, $candidate := $table.types }}
{{- if eq $candidate.topology $override }}
{{- $matches = append $matches $name }}
{{- end }}
{{- end }}
{{- $hint := "no TPU type has that topology" }}
{{- if $matches }}
{{- $hint = printf "types with topology %s: %s" $override ($matches | sortAlpha | join ", ") }}
{{- end }}
{{- fail (printf "tpu.topology=%q is inconsistent with tpu.type=%q, whose topology is %s; remove tpu.topology or choose a matching type (%s)" $override $type $row.topology $hint) }}
{{- end }}
{{- $chipsPerHost := int $row.chips_per_host }}
{{- $hosts := int $row.hosts }}
{{- $slices := int .Values.tpu.slices }}
{{- $_ := set $layout "tpuType" $type }}
{{- $_ = set $layout "acceleratorLabel" $family.accelerator }}
{{- $_ = set $layout "topology" $row.topology }}
{{- $_ = set $layout "chipsPerHost" $chipsPerHost }}
{{- $_ = set $layout "hostsPerSlice" $hosts }}
{{- $_ = set $layout "slices" $slices }}
{{- $_ = set $layout "devices" (mul $slices $hosts $chipsPerHost) }}
{{- $_ = set $layout "machineType" ($row.machine_type | default "") }}
{{- else }}
{{- $_ := set $layout "tpuType" "" }}
{{- $_ = set $layout "hostsPerSlice" (int .Values.cpu.hosts) }}
{{- $_ = set $layout "slices" 1 }}
{{- $_ = set $layout "devices" (int .Values.cpu.hosts) }}
{{- end }}
{{- toJson $layout }}
{{- end }}

{{/*
Render-time checks of the experiment config that need the layout, or that the
values schema cannot express. `distill validate` repeats the config-only rules.
The device mesh is FSDP over all devices divided by the tensor-parallel size, so
the data-parallel size is devices / tensor_parallel_size and must divide the
global batch.
*/}}
{{- define "distill.checkConfig" -}}
{{- $layout := include "distill.layout" . | fromJson }}
{{- $config := .Values.config }}
{{- $devices := int $layout.devices }}

{{- $mesh := $config.mesh | default dict }}
{{- $tensorParallel := int ($mesh.tensor_parallel_size | default 1) }}
{{- if ne (mod $devices $tensorParallel) 0 }}
{{- fail (printf "config.mesh.tensor_parallel_size=%d does not divide the %d devices of the run; choose a divisor of %d" $tensorParallel $devices $devices) }}
{{- end }}
{{- $dataParallel := div $devices $tensorParallel }}
{{- $batch := int $config.training.total_batch_size }}
{{- if ne (mod $batch $dataParallel) 0 }}
{{- fail (printf "config.training.total_batch_size=%d is not divisible by the data-parallel size %d (%d devices / tensor_parallel_size %d); use a multiple of %d such as %d" $batch $dataParallel $devices $tensorParallel $dataParallel (mul $dataParallel (add1 (div $batch $dataParallel)))) }}
{{- end }}

{{- range $name := list "huggingFace" "wandb" }}
{{- $reference := get $.Values.secrets $name | default dict }}
{{- $secretName := $reference.secretName | default "" }}
{{- if and $secretName (not (regexMatch "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" $secretName)) }}
{{- /* The value is not echoed: it may be the token itself. */}}
{{- fail (printf "secrets.%s.secretName is not a Secret name (lowercase letters, digits, '-' and '.'); it looks like an inline token. Store the token in a Secret (kubectl create secret generic NAME --from-literal=KEY=...) and set secrets.%s.secretName to NAME" $name $name) }}
{{- end }}
{{- end }}

{{- $metrics := $config.metrics | default dict }}
{{- if and (hasKey $metrics "port") (eq (int $metrics.port) 0) }}
{{- fail "config.metrics.port=0 picks a random port, which the pod spec and Service cannot name; set a fixed port such as 9400" }}
{{- end }}

{{- $data := $config.data }}
{{- $streaming := true }}
{{- if hasKey $data "streaming" }}
{{- $streaming = $data.streaming }}
{{- end }}
{{- $training := $config.training }}
{{- if and $streaming (not $training.max_training_steps) (not $training.per_epoch_training_steps) }}
{{- fail "config.data.streaming is true but neither config.training.max_training_steps nor config.training.per_epoch_training_steps is set; a stream never ends, so set one of them" }}
{{- end }}
{{- end }}
