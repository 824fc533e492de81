{{/*
The policy component: the policy document (ConfigMap `policy.yaml`) and the checks that keep the
chart from rendering a policy the webhook's loader (diskplan/policy.py `load_policy`) refuses.

The schema checks each value alone; the loader also compares values with each other (a profile
above sizing.maxCPU, maxTotalPerVM below maxDiskSize, imageLibrary inside root...). A policy it
refuses makes a new pod exit at start (crash loop) and a running one keep its last good policy, so
`diskhooks.policy.check` repeats those checks here and fails the install/upgrade naming the values
key. Keys the user removed (set to null) are checked with the loader's defaults, which are
repeated below. tests/test_chart.py renders tables of good and bad values and loads every good
result with the real loader, so the two cannot drift apart unnoticed.
*/}}

{{- define "diskhooks.policy.name" -}}
{{- printf "%s-policy" (include "diskhooks.fullname" .) -}}
{{- end -}}

{{- define "diskhooks.sidecar.image" -}}
{{- $img := .Values.sidecar.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* The platform policy document (diskplan.policy.load_policy reads it). */}}
{{- define "diskhooks.policy.document" -}}
{{- include "diskhooks.policy.check" . -}}
{{- $p := .Values.policy | default dict -}}
{{- $allowed := (get ($p.sidecar | default dict) "allowedImages") | default list -}}
{{- $sidecar := dict "image" (include "diskhooks.sidecar.image" .) "imagePullPolicy" .Values.sidecar.image.pullPolicy "allowedImages" $allowed -}}
{{- $doc := dict "hostDisks" ($p.hostDisks | default dict) "passthrough" ($p.passthrough | default dict) "sizing" ($p.sizing | default dict) "sidecar" $sidecar -}}
{{- if .Values.nodeAgent.enabled -}}
{{- $agent := dict "serviceAccount" (include "diskhooks.node.serviceAccount" .) -}}
{{- $mig := .Values.nodeAgent.migration | default dict -}}
{{- if $mig.enabled -}}
{{- $_ := set $agent "migration" (dict "keepSource" ($mig.keepSource | default "untilStarted")) -}}
{{- end -}}
{{- $_ := set $doc "nodeAgent" $agent -}}
{{- end -}}
{{- with (.Values.kubevirt | default dict).controllerServiceAccount -}}
{{- $_ := set $doc "kubevirt" (dict "controllerServiceAccount" .) -}}
{{- end -}}
{{- toYaml $doc }}
defaultProfile: {{ if $p.defaultProfile }}{{ $p.defaultProfile | quote }}{{ else }}null{{ end }}
{{- end -}}

{{/*
Bytes of a Kubernetes quantity, read as diskplan/quantity.py `parse_bytes` reads it, printed as a
decimal integer; fails naming the values key. Argument: dict "key" "policy...." "value" V.
Helm has no quantity parser, so this one is exact in int64 arithmetic: digits{1,19}, an optional
fraction of up to 9 digits, an optional suffix k M G T P E (powers of 1000) or Ki..Ei (powers of
1024); the result must be a whole number of bytes, above zero and at most 2^63-1. A YAML number is
accepted only when it renders as a plain integer (the loader reads integers and strings only).
*/}}
{{- define "diskhooks.policy.bytes" -}}
{{- $key := .key -}}
{{- $v := .value -}}
{{- $max := 9223372036854775807 -}}
{{- $s := "" -}}
{{- if eq (typeOf $v) "string" -}}
{{- $s = trim $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) (eq (typeOf $v) "json.Number") -}}
{{- $s = toYaml $v | trim -}}
{{- if not (regexMatch "^[0-9]+$" $s) -}}
{{- fail (printf "%s: %s is not a whole number of bytes; write a quantity such as 2Ti or 500Gi" $key $s) -}}
{{- end -}}
{{- else -}}
{{- fail (printf "%s: must be a quantity such as 2Ti or 500Gi, not %s" $key (kindOf $v)) -}}
{{- end -}}
{{- $re := "^([0-9]{1,19})(\\.([0-9]{1,9}))?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$" -}}
{{- if not (regexMatch $re $s) -}}
{{- fail (printf "%s: %q is not a quantity such as 20Gi or 500M" $key $s) -}}
{{- end -}}
{{- $int := regexReplaceAll "^0+" (regexReplaceAll $re $s "${1}") "" | default "0" -}}
{{- $frac := regexReplaceAll "0+$" (regexReplaceAll $re $s "${3}") "" -}}
{{- $suffix := regexReplaceAll $re $s "${4}" -}}
{{- if and (eq (len $int) 19) (gt $int "9223372036854775807") -}}
{{- fail (printf "%s: %q is too large" $key $s) -}}
{{- end -}}
{{- $unit := index (dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976) $suffix -}}
{{- $fracBytes := 0 -}}
{{- $n := len $frac -}}
{{- if gt $n 0 -}}
{{- $digits := atoi $frac -}}
{{- if hasSuffix "i" $suffix -}}
{{- /* d/10^n * 2^b with b >= 10 > n: whole iff 5^n divides d; then (d/5^n) * (2^b/2^n) */ -}}
{{- $pow5 := index (list 1 5 25 125 625 3125 15625 78125 390625 1953125) $n -}}
{{- if ne (mod $digits $pow5) 0 -}}
{{- fail (printf "%s: %q is not a whole number of bytes" $key $s) -}}
{{- end -}}
{{- $fracBytes = mul (div $digits $pow5) (div $unit (index (list 1 2 4 8 16 32 64 128 256 512) $n)) -}}
{{- else -}}
{{- /* d/10^n * 10^a (trailing zeros of d removed): whole iff n <= a */ -}}
{{- $exp := index (dict "" 0 "k" 3 "M" 6 "G" 9 "T" 12 "P" 15 "E" 18) $suffix -}}
{{- if gt $n $exp -}}
{{- fail (printf "%s: %q is not a whole number of bytes" $key $s) -}}
{{- end -}}
{{- $fracBytes = mul $digits (div $unit (index (list 1 10 100 1000 10000 100000 1000000 10000000 100000000 1000000000) $n)) -}}
{{- end -}}
{{- end -}}
{{- $whole := atoi $int -}}
{{- if gt $whole (div (sub $max $fracBytes) $unit) -}}
{{- fail (printf "%s: %q is too large" $key $s) -}}
{{- end -}}
{{- $bytes := add (mul $whole $unit) $fracBytes -}}
{{- if le $bytes 0 -}}
{{- fail (printf "%s: %q must be greater than zero" $key $s) -}}
{{- end -}}
{{- $bytes -}}
{{- end -}}

{{/*
A node directory as the loader wants it (diskplan/plan.py is_clean_abs_path, policy.py SYSTEM_DIRS).
Argument: dict "key" "policy.hostDisks.root" "value" PATH.
*/}}
{{- define "diskhooks.policy.nodeDir" -}}
{{- $key := .key -}}
{{- $v := .value -}}
{{- if not (kindIs "string" $v) -}}
{{- fail (printf "%s: must be a string (an absolute node directory)" $key) -}}
{{- end -}}
{{- if or (not (regexMatch "^(/[A-Za-z0-9._+-]+)+$" $v)) (regexMatch "(^|/)\\.\\.?(/|$)" $v) -}}
{{- fail (printf "%s: %q is not a clean absolute path (no '..', '.', '//' or trailing '/'; letters, digits, '._+-')" $key $v) -}}
{{- end -}}
{{- range list "/bin" "/boot" "/dev" "/etc" "/lib" "/lib64" "/proc" "/run" "/sbin" "/sys" "/usr" "/var/run" "/var/lib/kubelet" -}}
{{- if or (eq $v .) (hasPrefix (printf "%s/" .) $v) -}}
{{- fail (printf "%s: %s lies in the system directory %s" $key $v .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* An OCI image reference as diskplan/policy.py IMAGE_REF accepts it. */}}
{{- define "diskhooks.policy.imageRef" -}}
^[a-z0-9]([a-z0-9._:-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$
{{- end -}}

{{/*
The loader's cross-field checks (diskplan/policy.py), failing with the values key. Defaults of
keys set to null are the loader's: HostDiskPolicy, DriverDefaults, SizingPolicy.
*/}}
{{- define "diskhooks.policy.check" -}}
{{- $p := .Values.policy | default dict -}}
{{- /* hostDisks */ -}}
{{- $hd := $p.hostDisks | default dict -}}
{{- $root := index $hd "root" | default "/var/lib/diskhooks/vms" -}}
{{- include "diskhooks.policy.nodeDir" (dict "key" "policy.hostDisks.root" "value" $root) -}}
{{- $library := index $hd "imageLibrary" -}}
{{- if not (kindIs "invalid" $library) -}}
{{- include "diskhooks.policy.nodeDir" (dict "key" "policy.hostDisks.imageLibrary" "value" $library) -}}
{{- if or (eq $root $library) (hasPrefix (printf "%s/" $library) $root) (hasPrefix (printf "%s/" $root) $library) -}}
{{- fail (printf "policy.hostDisks.imageLibrary: %s overlaps policy.hostDisks.root %s (VMs could write into the image library, or see other VMs' disks); use separate directories, e.g. /var/lib/diskhooks/vms and /var/lib/diskhooks/images" $library $root) -}}
{{- end -}}
{{- end -}}
{{- $maxDiskQ := index $hd "maxDiskSize" -}}
{{- if kindIs "invalid" $maxDiskQ }}{{ $maxDiskQ = "2Ti" }}{{ end -}}
{{- $maxTotalQ := index $hd "maxTotalPerVM" -}}
{{- if kindIs "invalid" $maxTotalQ }}{{ $maxTotalQ = "8Ti" }}{{ end -}}
{{- $maxDisk := include "diskhooks.policy.bytes" (dict "key" "policy.hostDisks.maxDiskSize" "value" $maxDiskQ) | atoi -}}
{{- $maxTotal := include "diskhooks.policy.bytes" (dict "key" "policy.hostDisks.maxTotalPerVM" "value" $maxTotalQ) | atoi -}}
{{- if lt $maxTotal $maxDisk -}}
{{- fail (printf "policy.hostDisks.maxTotalPerVM (%v) must be at least policy.hostDisks.maxDiskSize (%v)" $maxTotalQ $maxDiskQ) -}}
{{- end -}}
{{- $drv := index $hd "defaults" | default dict -}}
{{- $io := index $drv "io" | default "native" -}}
{{- $cache := index $drv "cache" | default "none" -}}
{{- if and (eq $io "native") (not (has $cache (list "none" "directsync"))) -}}
{{- fail (printf "policy.hostDisks.defaults.io: native needs policy.hostDisks.defaults.cache none or directsync (cache is %s); use io: threads" $cache) -}}
{{- end -}}
{{- /* hostDisks.capacity.reserve: a percentage of at most 50, or a quantity (0: none) */ -}}
{{- $reserve := index (index $hd "capacity" | default dict) "reserve" -}}
{{- if not (kindIs "invalid" $reserve) -}}
{{- $r := toString $reserve -}}
{{- if hasSuffix "%" $r -}}
{{- $pct := trimSuffix "%" $r -}}
{{- if or (not (regexMatch "^[0-9]{1,6}(\\.[0-9]{1,6})?$" $pct)) (gt (float64 $pct) 50.0) -}}
{{- fail (printf "policy.hostDisks.capacity.reserve: %q is not a percentage from 0%% to 50%% (of the filesystem's size)" $r) -}}
{{- end -}}
{{- else if ne $r "0" -}}
{{- $_ := include "diskhooks.policy.bytes" (dict "key" "policy.hostDisks.capacity.reserve" "value" $reserve) -}}
{{- end -}}
{{- end -}}
{{- /* sizing */ -}}
{{- $sz := $p.sizing | default dict -}}
{{- $maxCPU := 64 -}}
{{- with index $sz "maxCPU" }}{{ $maxCPU = toString . | atoi }}{{ end -}}
{{- $maxSockets := 2 -}}
{{- with index $sz "maxSockets" }}{{ $maxSockets = toString . | atoi }}{{ end -}}
{{- if gt $maxSockets $maxCPU -}}
{{- fail (printf "policy.sizing.maxSockets (%d) must not exceed policy.sizing.maxCPU (%d)" $maxSockets $maxCPU) -}}
{{- end -}}
{{- $maxMemQ := index $sz "maxMemory" -}}
{{- if kindIs "invalid" $maxMemQ }}{{ $maxMemQ = "256Gi" }}{{ end -}}
{{- $maxMem := include "diskhooks.policy.bytes" (dict "key" "policy.sizing.maxMemory" "value" $maxMemQ) | atoi -}}
{{- if lt $maxMem 1048576 -}}
{{- fail (printf "policy.sizing.maxMemory (%v) must be at least 1Mi" $maxMemQ) -}}
{{- end -}}
{{- $profiles := index $sz "profiles" | default dict -}}
{{- range $name := keys $profiles | sortAlpha -}}
{{- $prof := index $profiles $name -}}
{{- $where := printf "policy.sizing.profiles.%s" $name -}}
{{- if not (kindIs "map" $prof) -}}
{{- fail (printf "%s: must be {cpu: N, memory: Q} (to drop a default profile, set it to null in your values: %s: null)" $where $name) -}}
{{- end -}}
{{- $cpu := toString (index $prof "cpu") | atoi -}}
{{- if gt $cpu $maxCPU -}}
{{- fail (printf "%s.cpu: %d exceeds policy.sizing.maxCPU %d (lower the profile's cpu, or drop it with `%s: null` in your values)" $where $cpu $maxCPU $name) -}}
{{- end -}}
{{- $memQ := index $prof "memory" -}}
{{- $mem := include "diskhooks.policy.bytes" (dict "key" (printf "%s.memory" $where) "value" $memQ) | atoi -}}
{{- if ne (mod $mem 1048576) 0 -}}
{{- fail (printf "%s.memory: %v must be a whole number of Mi (e.g. 4Gi or 4096Mi)" $where $memQ) -}}
{{- end -}}
{{- if gt $mem $maxMem -}}
{{- fail (printf "%s.memory: %v exceeds policy.sizing.maxMemory %v (lower the profile's memory, or drop it with `%s: null` in your values)" $where $memQ $maxMemQ $name) -}}
{{- end -}}
{{- end -}}
{{- with $p.defaultProfile -}}
{{- if not (hasKey $profiles .) -}}
{{- fail (printf "policy.defaultProfile %q is not a profile in policy.sizing.profiles (%s)" . (keys $profiles | sortAlpha | join ", " | default "none are defined")) -}}
{{- end -}}
{{- end -}}
{{- /* sidecar */ -}}
{{- $imageRef := include "diskhooks.policy.imageRef" . -}}
{{- $image := include "diskhooks.sidecar.image" . -}}
{{- if not (regexMatch $imageRef $image) -}}
{{- fail (printf "sidecar.image.repository: %q is not an image reference the webhook accepts (lowercase registry/repository, then :tag or @sha256:digest)" $image) -}}
{{- end -}}
{{- $allowed := get ($p.sidecar | default dict) "allowedImages" | default list -}}
{{- range $i, $pattern := $allowed -}}
{{- $where := printf "policy.sidecar.allowedImages[%d]" $i -}}
{{- if eq $pattern "*" -}}
{{- fail (printf "%s: a lone '*' would allow any image; list images or registry prefixes such as registry.example.com/hooks/*" $where) -}}
{{- end -}}
{{- if contains "*" (trimSuffix "*" $pattern) -}}
{{- fail (printf "%s: '*' is only allowed at the end (a prefix)" $where) -}}
{{- end -}}
{{- if not (regexMatch $imageRef (regexReplaceAll "[/:]+$" (trimSuffix "*" $pattern) "" | default "x")) -}}
{{- fail (printf "%s: %q is not an image reference or prefix (lowercase registry/repository[:tag], or a prefix ending in *)" $where $pattern) -}}
{{- end -}}
{{- end -}}
{{- end -}}
