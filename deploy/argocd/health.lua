-- Argo CD health check for Drop's kinds with a status: CachedImage, CachedImageSet and
-- DiscoveryPolicy (PullPolicy is configuration only; Argo CD counts it healthy as it is).
-- Install it under resource.customizations.health.drop.corewire.io_<Kind> (see docs/gitops.md).
--
--   Progressing  the operator has not yet observed the current spec, or Ready is False while work
--                goes on (pulls under way or waiting their turn, no node to cache on yet)
--   Healthy      Ready is True
--   Degraded     Ready is False for a reason that needs someone to act (failing pulls, a missing
--                PullPolicy or DiscoveryPolicy, discovery sources that do not answer)
local hs = {}
local degraded = {
  PullFailed = true,
  PolicyNotFound = true,
  Degraded = true,
  DiscoveryPolicyNotFound = true,
  PartiallyFailed = true,
  SourceError = true,
  SyncFailed = true,
  ConnectionRefused = true,
  DNSError = true,
}

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if status == nil or status.observedGeneration == nil or generation == nil
    or status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Drop operator to observe the current spec"
  return hs
end

local ready = nil
for _, condition in ipairs(status.conditions or {}) do
  if condition.type == "Ready" then
    ready = condition
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Drop operator to report readiness"
  return hs
end

hs.message = ready.message
if ready.status == "True" then
  hs.status = "Healthy"
elseif degraded[ready.reason] then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
return hs
