-- The ranking policy (an experiment's arm, or cold_start) that showed each logged item; '' = not known
-- (events logged before this column, or by a process without experiments). gmco ope --policy reads it.
ALTER TABLE feedback_event ADD COLUMN policy text NOT NULL DEFAULT '';
