-- Orthanc Lua routing: the alternative to the Python plugin. Every series that becomes
-- stable (no new instance for "StableAge" seconds) is sent to a standalone `iqe node`,
-- declared in "DicomModalities" as "iqe-node"; the node sends its SR / Parametric Map /
-- SC results back to this Orthanc by C-STORE ([destination] in node.toml).
-- Enable with  "LuaScripts": [ "/opt/iqe-engine/deploy/orthanc/route_to_iqe_node.lua" ]

function OnStableSeries(seriesId, tags, metadata)
   -- Results come back as new series; never route them to the node again.
   local description = tags['SeriesDescription'] or ''
   local modality = tags['Modality'] or ''
   if string.sub(description, 1, 3) == 'IQE' or modality == 'SR' then
      return
   end
   print('IQE: routing series ' .. (tags['SeriesInstanceUID'] or seriesId) .. ' to iqe-node')
   -- An asynchronous C-STORE job of the whole series (Orthanc's Lua SendToModality takes
   -- instances only); a failed job is listed under /jobs and can be resubmitted there.
   local request = { Resources = { seriesId }, Asynchronous = true }
   RestApiPost('/modalities/iqe-node/store', DumpJson(request, true), false)
end
